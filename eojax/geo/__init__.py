"""Geographic pretext labels and losses: where (coordinates, Koppen-Geiger climate) and when (day of
year) a tile was taken, made from the georeferenced data itself (see docs/geo.md)."""
