"""Test setup: 8 simulated CPU devices, shared data location, tiny models.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of conftest.
"""
import collections
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Test programs are tiny and compiled far more than they run: LLVM at -O0 compiles them ~25% faster
# (the diffusion CLI run: 70 s instead of 92 s, same losses). Libraries do the heavy ops (dots, convs)
# either way. Subprocesses and notebook kernels inherit these flags (helpers.xla_flags).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole suite, inherited by the xdist workers, the CLI
# subprocesses and the notebook kernels: many tests compile the same tiny programs (a resumed run, a
# second process, the same runlocal step in another test), and compiling dominates their time. The
# cache key is the whole program plus compiler options and versions, so a hit cannot change a result.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"eojax-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# No eviction (-1): JAX's LRU eviction needs an "-atime" file beside every entry, and a test that SIGKILLs
# a run between the two writes leaves an entry without one, after which every later write fails. The
# suite adds ~75 MB per code change; the controller empties a cache grown past 2 GiB instead.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
if "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(_cache):
    if sum(e.stat().st_size for e in os.scandir(_cache) if e.is_file()) > 2 << 30:
        shutil.rmtree(_cache, ignore_errors=True)

import pathlib

import pytest


# Left out of the fast tier (`-m "not slow"`, under 5 min cold on 2 cores), run by the full suite: the
# heaviest tests whose ground the fast tier still covers with a cheaper sibling (cold durations of
# 9-38 s each, measured 2026-12-03). A name matches a test and all its parameters, or one parameter.
SLOW_IN_FAST_TIER = (
    "tests/test_docs.py::",  # the pdoc build they share: 25-40 s
    "tests/test_checkpoint_integrity.py::test_records_match_an_independent_checksum",  # the run they share: 28 s
    "tests/test_checkpoint_integrity.py::test_damaged_newest_step_falls_back",
    "tests/test_checkpoint_integrity.py::test_damaged_unverified_step_falls_back",
    "tests/test_checkpoint_integrity.py::test_no_intact_step_is_a_one_line_error",
    "tests/test_checkpoint_integrity.py::test_resumed_run_sets_corrupt_step_aside_and_saves_it_again",
    "tests/test_checkpoint_integrity.py::test_restore_of_a_named_corrupt_step_refuses",
    "tests/test_checkpoint_integrity.py::test_verify_run_report",
    "tests/test_features.py::test_export_needs_no_training_data",
    "tests/test_data_spec.py::test_core_is_built_from_config_and_spec_alone[diffusion]",
    "tests/test_data_spec.py::test_core_is_built_from_config_and_spec_alone[satmae]",
    "tests/test_model_state.py::test_ema_averages_the_statistics_and_eval_uses_them",
    "tests/test_seg.py::test_every_decoder_trains[muster-",
    "tests/test_seg.py::test_every_decoder_trains[upernet-finetune]",
    "tests/test_seg.py::test_end_to_end_best_checkpoint_test_split_and_results",
    "tests/test_seg.py::test_sweep_matches_sequential_probes",
    "tests/test_seg.py::test_seg_resize_scores_against_full_resolution_labels",
    "tests/test_diffusion.py::test_core_from_saved_spec_needs_no_captions",
    "tests/test_train.py::test_config_kernels_selects_what_the_train_step_traces[plain]",
    "tests/test_train.py::test_sharded_step_matches_one_device[mesh1-fsdp]",
    "tests/test_parity_prithvi_satmae.py::test_satmae_pretraining_matches_reference[contiguous-bands]",
    "tests/test_legacy_runs.py::test_legacy_seg_run_evaluates_to_its_recorded_metrics",
    "tests/test_lora.py::test_trainer_changes_only_the_adapters",
    "tests/test_lora.py::test_the_optimizer_holds_only_adapter_state",
    "tests/test_lora.py::test_inference_sees_the_merged_params",
    "tests/test_vsat.py::test_pretrained_hf_gpt2_with_bpe",
    "tests/test_vsat.py::test_aispace_lora_fine_tune_trains_only_the_adapters",
    "tests/test_lora.py::test_resuming_with_another_alpha_is_refused",
    "tests/test_seg.py::test_every_decoder_trains[upernet-frozen]",
    "tests/test_seg.py::test_every_decoder_trains[segformer-finetune]",
    "tests/test_parity_prithvi_satmae.py::test_satmae_pretraining_matches_reference[s2-reference]",
    # session 12 (fast tier 5:55 cold before these, ~150 s of test time moved)
    "tests/test_training_regularisers.py::test_layer_decay_scales_one_step_by_the_reference_factors",  # 15 s
    "tests/test_training_regularisers.py::test_encoder_drops_each_blocks_branch_at_its_rate",  # 12 s both
    "tests/test_seg_cnn.py::test_unet_trains_from_scratch_through_the_trainer",  # 8 s
    "tests/test_seg_cnn.py::test_frozen_resnet_from_a_torchvision_file_keeps_params_and_statistics",  # 8 s
    "tests/test_seg_cnn.py::test_finetune_resnet_updates_its_statistics",  # 7 s
    "tests/test_classify.py::test_resnet_encoder_init_brings_its_running_statistics",  # 8 s
    "tests/test_classify.py::test_multi_label_loss_is_the_mean_binary_cross_entropy",  # 6 s
    "tests/test_classify_fidelity.py::test_global_pool_classifier_gives_the_reference_logits",  # 8 s
    "tests/test_vsat_context.py::test_loss_is_the_weighted_l1_and_sophia_counts_real_rows",  # 13 s
    "tests/test_lora.py::test_setup_names_a_pattern_that_matches_nothing",  # 14 s (setup)
    "tests/test_train.py::test_config_kernels_selects_what_the_train_step_traces[xla_cpu]",  # 12 s
    "tests/test_train.py::test_sharded_step_matches_one_device[mesh0-model]",  # 19 s with setup
    "tests/test_parity_prithvi_satmae.py::test_satmae_pretraining_matches_reference[s2-auto]",  # 9 s
    "tests/test_seg.py::test_retrain_input_trains_only_the_input_layer[dofa]",  # 7 s
    # session 13: the Stable Diffusion path; the fast tier keeps each part's parity test
    "tests/test_webui.py::test_the_server_binds_to_loopback_and_serves_the_form",  # the page's server compiles
    "tests/test_webui.py::test_post_gives_sd_generates_png",  # the pipeline at start: ~20 s for the four
    "tests/test_webui.py::test_bad_input_is_a_400_with_one_line",
    "tests/test_webui.py::test_bad_json_body_is_a_400",
    "tests/test_prompt_writer.py::test_cli_infer_prompt_writer",  # a CLI process; in-process infer stays
    "tests/test_inception_parity.py::test_pool3_features_match_pytorch_fid[299]",  # 299-311 px InceptionV3
    "tests/test_inception_parity.py::test_pool3_features_match_pytorch_fid[large]",
    "tests/test_inception_parity.py::test_fixture_separates_the_fid_variant_and_the_resize",
    "tests/test_sd_pipeline.py::test_the_folder_scheduler_is_pndm_and_seeds_are_per_image",
    "tests/test_sd_train.py::test_unet_remat_keeps_params_outputs_and_gradients",
    "tests/test_sd_train.py::test_sampling_equals_sd_generate_with_the_negative_prompt_and_suffix",  # 9 s
    "tests/test_prompt_writer.py::test_infer_writes_one_prompt_per_class",  # 11 s of set-up
    # session 15 (fast tier 5:31 cold before these; ~60 s of test time moved)
    "tests/test_sd_train.py::test_unet_any_size_equals_diffusers_at_sizes_the_up_path_does_not_divide",  # 15 s
    "tests/test_train.py::test_frozen_parameters_have_no_average_and_are_read_back_live",  # 10 s
    "tests/test_api.py::test_load_gives_back_the_config_spec_and_ema_params",  # the trained seg run: 10 s
    "tests/test_api.py::test_predict_is_the_infer_plugins_output_with_coordinates_and_crs",
    "tests/test_api.py::test_predict_refuses_an_array_without_the_models_bands",
    "tests/test_seg.py::test_every_decoder_trains[fcn-frozen]",  # 6 s
    "tests/test_group_mae.py::test_init_from_a_satmae_pytorch_layout_file",  # 7 s
    "tests/test_sd_pipeline.py::test_the_pipeline_gives_diffusers_latents_and_image[ddim]",  # 5 s
)


def _unit(nodeid: str) -> str:
    """A test's scheduling unit under xdist: its file (whose module fixtures and compiled functions its
    tests then share on one worker), except a notebook, which is long and independent: a unit of its own."""
    module = nodeid.split("::")[0]
    return nodeid if module.endswith("test_notebook.py") else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks the fast tier's exclusions as slow, then orders the units longest-first (a slow test weighs
    20, another 1; a stable sort, so each file keeps its own order), so that the last unit to start on a
    worker is a short one. tryfirst: `-m "not slow"` deselects after this."""
    for item in items:
        if any(item.nodeid == name or item.nodeid.startswith(name if name.endswith(("-", "::")) else name + "[")
               for name in SLOW_IN_FAST_TIER):
            item.add_marker(pytest.mark.slow)
    weight = collections.Counter()
    for item in items:
        weight[_unit(item.nodeid)] += 20 if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: -weight[_unit(item.nodeid)])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n 2 --dist loadgroup` (scripts/test.sh): each unit (_unit) goes whole to one worker, in the order
    above. Not xdist's own loadgroup: it renames each test to carry its xdist_group, which pytest 9's node
    ids ignore, so every test became its own unit and module fixtures were built on both workers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order of the collection
    return UnitScheduling(config, log)


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
    """../shared/data, found through EOJAX_TEST_DATA (set by .ci/run)."""
    root = os.environ.get("EOJAX_TEST_DATA")
    if not root:
        guess = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
        root = str(guess) if guess.is_dir() else ""
    if not root or not pathlib.Path(root).is_dir():
        pytest.fail("EOJAX_TEST_DATA does not point at the shared data folder (../shared/data)")
    return pathlib.Path(root)
