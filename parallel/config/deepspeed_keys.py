"""DeepSpeed config keys parallel3d does not map: ignored (with the reason printed for each) or
accepted only when off (with the error naming the fix). Used by :mod:`parallel.config.deepspeed`;
source: https://www.deepspeed.ai/docs/config-json/ and DeepSpeed's config classes."""

PERF = "speed/memory tuning only; the numbers do not change"

# top level: key → why it is ignored
IGNORED = {
    "steps_per_print": "logging cadence; parallel3d logs every train.log_every steps",
    "wall_clock_breakdown": "timing printout only", "memory_breakdown": "memory printout only",
    "dump_state": "debug printout only", "flops_profiler": "profiler only", "comms_logger": "logging only",
    "tensorboard": "monitor output; parallel3d writes train.metrics_file", "wandb": "monitor output",
    "csv_monitor": "monitor output", "comet": "monitor output", "timers": "timing only", "log_level": "logging only",
    "zero_allow_untested_optimizer": "permission flag; parallel3d's ZeRO runs every optimizer it builds",
    "zero_force_ds_cpu_optimizer": "picks DeepSpeed's CPU Adam kernel; offloaded Adam is the same math",
    "aio": "NVMe IO tuning; parallel3d sizes its IO with zero.offload.buffer_*", "autotuning": "DeepSpeed's tuner",
    "checkpoint": "DeepSpeed checkpoint-engine options; parallel3d uses train.checkpoint",
    "nebula": "DeepSpeed checkpoint service", "compile": "compilation; speed only", "disable_python_gc": PERF,
    "disable_allgather": PERF, "fp32_allreduce": "all-reduce dtype: rounding only, the mean is the same",
    "communication_data_type": "all-reduce dtype: rounding only, the mean is the same",
    "prescale_gradients": "only moves the 1/N of the gradient mean before the all-reduce",
    "gradient_predivide_factor": "only splits the 1/N of the gradient mean around the all-reduce",
    "sparse_gradients": "sparse embedding-gradient all-reduce; the sum is the same", "graph_harvesting": PERF,
    "seq_parallel_communication_data_type": "Ulysses sequence parallel only", "dataloader_drop_last":
    "DeepSpeed's dataloader; parallel3d takes exact global batches", "pipeline": "DeepSpeed PipelineModule "
    "options; parallel3d's pipeline layout comes from parallel.pp*", "use_data_before_expert_parallelism": "MoE only",
}
# top level: key → (values that mean "off", why an "on" value is an error and what to do)
OFF_ONLY = {
    "gradient_allreduce_op": (("mean",), "a summed (not averaged) gradient changes every update: use \"mean\""),
    "managed_gradient_accumulation": ((True,), "parallel3d owns the accumulation boundary: remove the key"),
    "sequence_parallel_size": ((1,), "DeepSpeed-Ulysses is not available: remove it (see parallel.sequence_parallel)"),
}
# blocks that change the model, data or math when enabled
FEATURES = ("amp", "torch_autocast", "elasticity", "curriculum_learning", "data_efficiency", "eigenvalue",
             "quantize_training", "hybrid_engine", "tensor_parallel")
PRESENT_MEANS_ON = ("compression_training", "sparse_attention", "weight_quantization")

ZERO_IGNORED = {k: PERF for k in (
    "contiguous_gradients", "reduce_scatter", "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
    "use_multi_rank_bucket_allreduce", "sub_group_size", "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold", "stage3_max_live_parameters",
    "zero_hpz_partition_size", "mics_shard_size", "mics_hierarchical_params_gather", "memory_efficient_linear",
    "override_module_apply", "cpu_offload_use_pin_memory", "stage3_module_granularity_threshold",
    "module_granularity_threshold", "log_trace_cache_warnings", "stage3_use_all_reduce_for_fetch_params")}
ZERO_IGNORED.update({
    "overlap_comm": "parallel3d overlaps gradient communication with backward on its own; the numbers do not change",
    "load_from_fp32_weights": "checkpoint loading; parallel3d checkpoints keep fp32 master weights",
    "elastic_checkpoint": "checkpoint format; parallel3d checkpoints reshard on load",
    "stage3_gather_16bit_weights_on_model_save": "save format; parallel3d saves sharded checkpoints",
    "stage3_gather_fp16_weights_on_model_save": "save format; parallel3d saves sharded checkpoints",
    "pipeline_loading_checkpoint": "checkpoint loading detail",
    "ignore_unused_parameters": "error-reporting switch for unused parameters",
})
ZERO_OFF_ONLY = {k: ((False,), "quantized ZeRO communication changes the numbers: set it to false")
                  for k in ("zero_quantized_weights", "zero_quantized_nontrainable_weights",
                            "zero_quantized_gradients")}
ZERO_OFF_ONLY["legacy_stage1"] = ((False,), "the legacy stage-1 implementation is gone from DeepSpeed: remove it")
ZERO_OFF_ONLY["zenflow"] = ((None,), "ZenFlow's stale, partial updates change the numbers: remove it")
OFFLOAD_IGNORED = {k: PERF for k in ("pin_memory", "fast_init", "pipeline_read", "pipeline_write", "pipeline",
                                       "max_in_cpu", "ratio")}
FP16_OFF_ONLY = {
    "auto_cast": ((False,), "DeepSpeed would cast float inputs to fp16; parallel3d's policy casts the model only: "
                            "set it to false"),
    "fp16_master_weights_and_grads": ((False,), "parallel3d keeps fp32 master weights: set it to false"),
}
BF16_OFF_ONLY = {
    "check_overflow": ((False,), "DeepSpeed would skip bf16 steps with inf/nan gradients: set it to false"),
    "check_grad_overflow": ((False,), "DeepSpeed would skip bf16 steps with inf/nan gradients: set it to false"),
    "bf16_master_weights_and_grads": ((False,), "parallel3d keeps fp32 master weights: set it to false"),
    "bf16_optimizer_states": ((False,), "parallel3d keeps fp32 optimizer states: set it to false"),
}
