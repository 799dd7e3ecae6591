"""The Virtual Satellite family: GPT-2 on satellite pixel time series written as GReaT text rows."""
