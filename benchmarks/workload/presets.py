"""Named workload specs: ``cpu-tiny``, ``gpu-2``, ``gpu-8``, ``gpu-64``, each in several arms.

``NAME`` is the bursty-long (headline) arm; ``NAME-uniform`` the Poisson/Azure control at the same
mean total rate and models; ``NAME-replay`` the Mooncake trace's own timestamps, time-compressed to
the same mean rate; ``cpu-tiny-ramp`` and ``gpu-2-ramp`` kvcached's staggered triangle ramps.
``get_preset(name)`` returns a ``WorkloadSpec``; change any field with ``dataclasses.replace`` (or
the CLI's overrides), e.g. ``total_rate`` for the rate sweep of BENCHMARK.md.

Model names encode the shape the runner instantiates: ``<shape>-<NN>`` with shape one of
``olmoe-1b-7b``, ``deepseek-v2-lite``, ``qwen3-30b-a3b`` (``model_shape(name)``), or a demo model
name (``demo-mixtral``, ``demo-qwen3-moe``, ``demo-deepseek-v3``; max positions 512). The order of
``model_names`` is the popularity rank (first = most popular); families are interleaved so that hot
and cold models of every family exist.

Durations are per replay of one mode; a bench run replays the trace once per mode (crosspool,
shared, static). The GPU presets compress the protocol's 60-300 s burst cycles to 30-90 s so that a
180 s trace holds several on/off cycles per burst group; the protocol's own values are one override
away (``--cycle-min-s 60 --cycle-max-s 300 --duration-s 900``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from benchmarks.workload.generate import WorkloadSpec, ramp_natural_duration_s
from benchmarks.workload.lengths import load_table

# demo models of crosspool_jax.demo (max_position_embeddings 512), most popular first
CPU_TINY_MODELS: tuple[str, ...] = ("demo-mixtral", "demo-qwen3-moe", "demo-deepseek-v3")
# tokens; prompt + output = 448 <= 512 max positions of the demo models
CPU_TINY_MAX_PROMPT_LEN = 384
CPU_TINY_MAX_OUTPUT_LEN = 64
# tokens; the per-request context limit the GPU presets are built for (prompt + output = 131,072 =
# 128K, what one request may take of the pool); Mooncake's longest prompt is 126,195, so the cap
# only matters if a runner lowers it
GPU_MAX_CONTEXT = 131072
GPU_MAX_OUTPUT_LEN = 4096
GPU_MAX_PROMPT_LEN = GPU_MAX_CONTEXT - GPU_MAX_OUTPUT_LEN
SHAPES: tuple[str, ...] = ("olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b")


def mooncake_mean_rate() -> float:
    """Requests/s of the Mooncake conversation trace (12,031 requests over 3,537 s = 3.40)."""
    t = load_table("mooncake")
    return len(t) / float(t.arrival_s[-1])


def interleave(counts: dict[str, int]) -> tuple[str, ...]:
    """``<shape>-<NN>`` names for ``counts`` models per shape, families spread evenly over the ranks.

    Model ``j`` of a shape with ``c`` models sits at position ``(j + 0.5) / c``; names are sorted by
    position (ties: ``counts`` order), so e.g. {olmoe: 2, dsv2: 1} gives olmoe-00, dsv2-00, olmoe-01.
    """
    keyed = []
    for fi, (shape, c) in enumerate(counts.items()):
        keyed += [((j + 0.5) / c, fi, f"{shape}-{j:02d}") for j in range(c)]
    return tuple(name for _, _, name in sorted(keyed))


def model_shape(name: str) -> str:
    """The shape part of a ``<shape>-<NN>`` preset model name (a demo model name is its own shape)."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


# as many as crosspool's weights pool holds (one weights GPU of ~121 GiB arena for gpu-2, four for
# gpu-8: `crosspool bench --preset NAME --plan-only` prints the plan per mode)
GPU_2_MODELS = interleave({"olmoe-1b-7b": 9})
GPU_8_MODELS = interleave({"olmoe-1b-7b": 16, "deepseek-v2-lite": 8})
# 100 models on 64 GPUs (the simulator's large setup, issue 19): gpu-8's 2:1 mix of shapes
GPU_64_MODELS = interleave({"olmoe-1b-7b": 67, "deepseek-v2-lite": 33})


def cpu_tiny() -> WorkloadSpec:
    """Bursty long-context smoke test on 8 CPU devices: 120 s, the 3 demo models, ~1 req/s.

    alpha 1.3 (shares 0.61 / 0.25 / 0.15), on/off cycles 15-45 s with 50% off, burst groups of 1-2
    models (3 models cannot form two groups of 2-3). Gamma CV 2, not the protocol's 4: 120 s of 3
    models hold too few bursts for CV 4 (a model then gets fewer than 3 requests in 31% of seeds,
    and the total swings 62-184 requests between the 10th and 90th percentile of seeds; with CV 2:
    2.5% and 91-154), and a smoke test should exercise every model. Mooncake lengths scaled for
    tiny models: prompts / 64 (p50 6,909 -> 108 tokens), outputs / 16 (p50 350 -> 22); capped by
    clipping at max_prompt_len = 384 and max_output_len = 64 tokens (``CPU_TINY_MAX_*``; about 12%
    of prompts reach the cap). Replays in 120 s per mode.
    """
    return WorkloadSpec(
        arm="bursty-long",
        num_models=3,
        model_names=CPU_TINY_MODELS,
        total_rate=1.0,
        duration_s=120.0,
        alpha=1.3,
        cv=2.0,
        off_fraction=0.5,
        cycle_min_s=15.0,
        cycle_max_s=45.0,
        burst_group_min=1,
        burst_group_max=2,
        length_source="mooncake",
        max_prompt_len=CPU_TINY_MAX_PROMPT_LEN,
        max_output_len=CPU_TINY_MAX_OUTPUT_LEN,
        length_scale=64.0,
        output_length_scale=16.0,
    )


def cpu_tiny_uniform() -> WorkloadSpec:
    """``cpu-tiny``'s control: Poisson at the same 1 req/s, Azure conversation lengths / 8
    (prompt p50 1,020 -> 128 tokens, output p50 129 -> 16), same caps (384 / 64 tokens)."""
    return dataclasses.replace(
        cpu_tiny(),
        arm="uniform",
        cv=1.0,
        off_fraction=0.0,
        length_source="azure",
        length_scale=8.0,
        output_length_scale=8.0,
    )


def cpu_tiny_replay() -> WorkloadSpec:
    """Mooncake's own arrivals and lengths on the 3 demo models, slowed to ``cpu-tiny``'s 1 req/s
    (time_compression = 1 / 3.40), same scaling and caps; the first 120 s."""
    base = cpu_tiny()
    return dataclasses.replace(
        base,
        arm="replay",
        length_source=None,
        time_compression=round(base.total_rate / mooncake_mean_rate(), 4),
    )


def cpu_tiny_ramp() -> WorkloadSpec:
    """kvcached's staggered ramps, shrunk for CPU: 3 demo models, 0 -> 4 -> 1 req/s at 1 req/s per
    second, starts 9 s apart (kvcached's rule), fixed 128-token prompts and 32-token outputs;
    34 s (kvcached's natural end)."""
    spec = WorkloadSpec(
        arm="ramp",
        num_models=3,
        model_names=CPU_TINY_MODELS,
        duration_s=1.0,
        ramp_start_rps=0.0,
        ramp_peak_rps=4.0,
        ramp_end_rps=1.0,
        ramp_increment=1.0,
        length_source="fixed",
        fixed_prompt_len=128,
        fixed_output_len=32,
        max_prompt_len=CPU_TINY_MAX_PROMPT_LEN,
        max_output_len=CPU_TINY_MAX_OUTPUT_LEN,
    )
    return dataclasses.replace(spec, duration_s=ramp_natural_duration_s(spec))


def gpu_2() -> WorkloadSpec:
    """Headline bursty long-context preset for 2 GPUs: 9 models, 2 req/s, 180 s.

    Models (popularity order, ``GPU_2_MODELS``): 9 OLMoE-1B-7B-shaped (13.8 GB bf16 each, 12.0 GiB
    of it FFN): crosspool 1+1 holds every model's FFN (108 GiB) on the weights GPU and gives the
    KV GPU's arena minus 8 GiB of attention-side weights to one KV pool (~113 GiB); ``shared``
    puts 5 + 4 whole models on the two GPUs, leaving ~57 GiB of KV beside the weights on each,
    so the same aggregate KV is split in two pools by where the weights sit (plans with a 121 GiB
    arena per GPU; ``--plan-only`` prints them). alpha 1.3, Gamma CV 4, on/off cycles 30-90 s
    (50% off), burst groups of 2-3 models. Mooncake lengths unscaled, capped by clipping at
    max_prompt_len = 126,976 and max_output_len = 4,096 tokens (``GPU_MAX_*``: 128K context per
    request, the pool limit these presets assume; lower it if the runner's pool is smaller).
    """
    return WorkloadSpec(
        arm="bursty-long",
        num_models=len(GPU_2_MODELS),
        model_names=GPU_2_MODELS,
        total_rate=2.0,
        duration_s=180.0,
        alpha=1.3,
        cv=4.0,
        off_fraction=0.5,
        cycle_min_s=30.0,
        cycle_max_s=90.0,
        burst_group_min=2,
        burst_group_max=3,
        length_source="mooncake",
        max_prompt_len=GPU_MAX_PROMPT_LEN,
        max_output_len=GPU_MAX_OUTPUT_LEN,
    )


def gpu_2_uniform() -> WorkloadSpec:
    """``gpu-2``'s control: Poisson at the same 2 req/s over the same 9 models, Azure lengths."""
    return dataclasses.replace(gpu_2(), arm="uniform", cv=1.0, off_fraction=0.0, length_source="azure")


def gpu_2_replay() -> WorkloadSpec:
    """Mooncake's own arrivals and lengths over ``gpu-2``'s 9 models, time-compressed to its mean
    2 req/s (time_compression = 2 / 3.40); the first 180 s."""
    base = gpu_2()
    return dataclasses.replace(
        base,
        arm="replay",
        length_source=None,
        time_compression=round(base.total_rate / mooncake_mean_rate(), 4),
    )


def gpu_2_ramp() -> WorkloadSpec:
    """kvcached's like-for-like point: 3 OLMoE-1B-7B-shaped models, 0 -> 16 -> 1 req/s at 1 req/s
    per second, starts 36 s apart, fixed 256-token prompts and 256-token outputs, 139 s."""
    spec = WorkloadSpec(
        arm="ramp",
        num_models=3,
        model_names=tuple(f"olmoe-1b-7b-{i:02d}" for i in range(3)),
        duration_s=1.0,
        ramp_start_rps=0.0,
        ramp_peak_rps=16.0,
        ramp_end_rps=1.0,
        ramp_increment=1.0,
        length_source="fixed",
        fixed_prompt_len=256,
        fixed_output_len=256,
    )
    return dataclasses.replace(spec, duration_s=ramp_natural_duration_s(spec))


def gpu_8() -> WorkloadSpec:
    """Headline bursty long-context preset for 8 GPUs: 24 models, 8 req/s, 180 s.

    Models (``GPU_8_MODELS``): 16 OLMoE-1B-7B-shaped and 8 DeepSeek-V2-Lite-shaped (~31 GB),
    ~470 GB of weights on 8 x 141 GB; crosspool 4+4 holds their FFN expert-parallel on 4 weights
    GPUs. Same arrival and length law as
    ``gpu-2`` (alpha 1.3, CV 4, cycles 30-90 s, 50% off, groups of 2-3, Mooncake lengths clipped at
    max_prompt_len = 126,976 and max_output_len = 4,096 tokens).
    """
    return dataclasses.replace(
        gpu_2(), num_models=len(GPU_8_MODELS), model_names=GPU_8_MODELS, total_rate=8.0
    )


def gpu_8_uniform() -> WorkloadSpec:
    """``gpu-8``'s control: Poisson at the same 8 req/s over the same 24 models, Azure lengths."""
    return dataclasses.replace(gpu_8(), arm="uniform", cv=1.0, off_fraction=0.0, length_source="azure")


def gpu_8_replay() -> WorkloadSpec:
    """Mooncake's own arrivals and lengths over ``gpu-8``'s 24 models, time-compressed to 8 req/s
    (time_compression = 8 / 3.40); the first 180 s."""
    base = gpu_8()
    return dataclasses.replace(
        base,
        arm="replay",
        length_source=None,
        time_compression=round(base.total_rate / mooncake_mean_rate(), 4),
    )


def gpu_64() -> WorkloadSpec:
    """Bursty long-context preset for 64 GPUs and 100 cold models: 4 req/s, 900 s (~3,600 requests).

    Models (``GPU_64_MODELS``): 67 OLMoE-1B-7B-shaped and 33 DeepSeek-V2-Lite-shaped (gpu-8's 2:1
    mix), ~2 TB of weights on 64 x 141 GB. Same law as ``gpu-2`` (alpha 1.3, Gamma CV 4, 50% off,
    groups of 2-3, Mooncake lengths clipped at 126,976 / 4,096 tokens) with the protocol's own
    on/off cycles (60-300 s) over 900 s. The rate: at alpha 1.3 the most popular of 100 models gets
    32% of the requests, and no mode replicates a model, so one GPU (shared / static) serves it:
    4 req/s gives it ~1.3 req/s of ~12K-token Mooncake prompts, about half of one H200's measured
    prefill rate (35.8K tokens/s), twice that while its group bursts. At gpu-2's 1 req/s per GPU
    (64 req/s) that one GPU would be 6x overloaded in every mode. Built for ``crosspool simulate``
    (no 64-GPU machine is lent to run the bench).
    """
    return dataclasses.replace(
        gpu_2(), num_models=len(GPU_64_MODELS), model_names=GPU_64_MODELS, total_rate=4.0,
        duration_s=900.0, cycle_min_s=60.0, cycle_max_s=300.0,
    )


def gpu_64_uniform() -> WorkloadSpec:
    """``gpu-64``'s control: Poisson at the same 4 req/s over the same 100 models, Azure lengths."""
    return dataclasses.replace(gpu_64(), arm="uniform", cv=1.0, off_fraction=0.0, length_source="azure")


PRESETS: dict[str, Callable[[], WorkloadSpec]] = {
    "cpu-tiny": cpu_tiny,
    "cpu-tiny-uniform": cpu_tiny_uniform,
    "cpu-tiny-replay": cpu_tiny_replay,
    "cpu-tiny-ramp": cpu_tiny_ramp,
    "gpu-2": gpu_2,
    "gpu-2-uniform": gpu_2_uniform,
    "gpu-2-replay": gpu_2_replay,
    "gpu-2-ramp": gpu_2_ramp,
    "gpu-8": gpu_8,
    "gpu-8-uniform": gpu_8_uniform,
    "gpu-8-replay": gpu_8_replay,
    "gpu-64": gpu_64,
    "gpu-64-uniform": gpu_64_uniform,
}


def get_preset(name: str) -> WorkloadSpec:
    """The ``WorkloadSpec`` of preset ``name``; a ValueError lists the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown workload preset {name!r}; known: {', '.join(PRESETS)}") from None


def describe(name: str) -> str:
    """The first paragraph of the preset's docstring, on one line."""
    doc = (PRESETS[name].__doc__ or "").strip()
    return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
