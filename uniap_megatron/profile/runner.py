"""Run a profile: one process per device (started here, or by torchrun), collectives first,
then the layer shapes shared out among the processes; every finished step lands in the
profile file at once (atomically), so an interrupted run resumes where it stopped.

Under torchrun (``RANK``/``WORLD_SIZE`` set) the launched processes are the workers, across
nodes too, and inter-node collectives are measured. Started plainly, the command spawns
``profile.nproc`` workers on this host.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

from uniap_megatron.errors import InputError, UniapError
from uniap_megatron.profile import collectives as coll
from uniap_megatron.profile import format as fmt
from uniap_megatron.profile.options import ProfileRequest
from uniap_megatron.profile.shapes import shapes_for


class ProfileFailed(UniapError):
    """A worker process stopped with an error; what was measured before it is kept."""

    exit_code = 1


@dataclass(frozen=True)
class Work:
    """Everything a worker needs, decided once (by the parent or identically on every rank)."""

    request: ProfileRequest
    header: fmt.Profile
    """The identity of the profile being written, without measurements."""
    device: str
    layer_spec: str
    world: int
    ranks_per_node: int
    collectives: tuple[fmt.CollectiveKey, ...]
    shapes: tuple[fmt.LayerKey, ...]
    threads: int
    show_progress: bool


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _megatron_version() -> str:
    """From the installed distribution's metadata (importing megatron-core takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        from megatron.core import package_info

        return package_info.__version__


def environment(device: str, cluster_gpu: str, world: int, ranks_per_node: int) -> fmt.Environment:
    import torch

    cuda = device == "cuda"
    nccl = None
    if cuda:
        v = torch.cuda.nccl.version()
        nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    return fmt.Environment(
        device=device,
        device_name=torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        cluster_gpu=cluster_gpu,
        num_nodes=world // ranks_per_node,
        ranks_per_node=ranks_per_node,
        backend="nccl" if cuda else "gloo",
        torch=torch.__version__,
        megatron_core=_megatron_version(),
        cuda=torch.version.cuda if cuda else None,
        nccl=nccl,
    )


def _check_device(device: str, cluster_gpu: str, device_name: str) -> None:
    if device == "cpu" and cluster_gpu.lower() != "cpu":
        raise InputError(
            f"profile.device is the CPU but cluster.gpu is {cluster_gpu!r}: a CPU profile measures the CPU. "
            "Profile on the GPU machine, or use cluster=cpu."
        )
    if device == "cuda":
        family = cluster_gpu.split("-")[0].lower()
        if family not in device_name.lower():
            raise InputError(
                f"this machine's GPU is {device_name!r} but cluster.gpu is {cluster_gpu!r}: the profile would "
                "be filed under the wrong hardware. Choose the matching cluster (e.g. cluster=dgx_h100) or set cluster.gpu."
            )


def prepare(request: ProfileRequest, *, world: int | None = None, ranks_per_node: int | None = None,
            show_progress: bool = True, read_existing: bool = True) -> Work:
    """Decide the device, the header, and what is left to measure; refuse a file that holds
    another hardware's, software's or model's profile. (Under torchrun only rank 0 reads the
    file, which other nodes may not see, and shares its decisions.)"""
    import torch

    from uniap_megatron.profile.megatron_layers import implementation_of, resolve_layer_spec

    opts, plan = request.options, request.plan
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("profile.device is cuda but torch sees no GPU here; use profile.device=cpu with cluster=cpu.")
    if world is None:
        default = plan.cluster.gpus_per_node
        if device == "cuda":
            default = min(default, torch.cuda.device_count())
        world = opts.nproc or default
        ranks_per_node = world
    layer_spec = resolve_layer_spec(opts.layer_spec, device)
    if layer_spec == "transformer_engine" and device == "cpu":
        raise InputError("profile.layer_spec transformer_engine needs a GPU; on the CPU use local or local+sdpa.")
    env = environment(device, plan.cluster.gpu, world, ranks_per_node)
    _check_device(device, plan.cluster.gpu, env.device_name)
    header = fmt.Profile(
        environment=env,
        model={"name": plan.model.name, **fmt.layer_dims(plan.model)},
        dtype=plan.train.precision.value,
        implementation=implementation_of(layer_spec),
        layer_spec=layer_spec,
    )
    existing = None
    if read_existing and opts.output_path.exists():
        existing = fmt.load(opts.output_path)
        problem = fmt.identity_mismatch(existing, header)
        if problem:
            raise InputError(
                f"profile.output ({opts.output}) holds a profile measured elsewhere or for another model "
                f"({problem}); its numbers cannot be mixed with this run's. Choose another profile.output "
                "or remove the file."
            )
    topology = coll.Topology(world=world, ranks_per_node=ranks_per_node)
    todo_coll = coll.plan(topology, opts.collectives) if world > 1 else []
    shapes = shapes_for(plan.model, plan.cluster, plan.train, plan.pins, mbs=opts.mbs, max_mbs=opts.max_mbs,
                        recompute=opts.recompute) if opts.layers else []
    if existing is not None:
        todo_coll = [k for k in todo_coll if existing.collective(k) is None]
        shapes = [k for k in shapes if existing.layer(k) is None]
    # On the CPU each process stands for one device: one thread each keeps the processes
    # from contending for cores (and the timings from measuring that contention).
    threads = opts.threads or (1 if device == "cpu" else 4)
    return Work(request=request, header=header if existing is None else existing, device=device,
                layer_spec=layer_spec, world=world, ranks_per_node=ranks_per_node,
                collectives=tuple(todo_coll), shapes=tuple(shapes), threads=threads, show_progress=show_progress)


def quiet_imports() -> None:
    """megatron-core announces at import that Transformer Engine and Apex are absent, and
    torch that no CUDA runtime is found: true on a CPU host and no news to the user."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"(megatron|torch)(\.|$)")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(request: ProfileRequest, *, show_progress: bool = True) -> tuple[fmt.Profile | None, list[str]]:
    """Measure what is missing from ``profile.output`` and return the completed profile and
    the problems met (shapes that could not be measured). Under torchrun, ranks other than 0
    return no profile: rank 0 writes and reports."""
    quiet_imports()
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        work = prepare(request, world=world, ranks_per_node=per_node, show_progress=show_progress and rank == 0,
                       read_existing=rank == 0)
        problems = _worker(rank, work)
        if rank != 0:
            return None, problems
    else:
        work = prepare(request, show_progress=show_progress)
        if not work.collectives and not work.shapes:
            return work.header, []
        import torch.multiprocessing as mp

        port = _free_port()
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        try:
            mp.start_processes(_spawned, args=(work, port, queue), nprocs=work.world, start_method="spawn", join=True)
        except mp.ProcessRaisedException as err:
            last = [line for line in str(err).splitlines() if line.strip()][-1]
            raise ProfileFailed(f"a profiling process failed ({last}); what was measured so far is in "
                                f"{request.options.output}, and a re-run continues from there.") from None
        except mp.ProcessExitedException as err:
            raise ProfileFailed(f"a profiling process exited ({err}); a re-run continues from "
                                f"{request.options.output}.") from None
        problems = queue.get() if not queue.empty() else []
    return fmt.load(request.options.output_path), problems


def _spawned(rank: int, work: Work, port: int, queue) -> None:
    quiet_imports()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(work.world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(work.world))
    problems = _worker(rank, work)
    if rank == 0:
        queue.put(problems)


def _worker(rank: int, work: Work) -> list[str]:
    import torch
    import torch.distributed as dist

    if work.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.set_num_threads(work.threads)
    dist.init_process_group("nccl" if work.device == "cuda" else "gloo", rank=rank, world_size=work.world)
    try:
        # Every rank follows rank 0's plan of what to measure (the one that read the file).
        shared = [work if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        work = shared[0]
        from uniap_megatron.profile.progress import Reporter

        reporter = Reporter(enabled=rank == 0 and work.show_progress,
                            total=len(work.collectives) + len(work.shapes))
        with reporter:
            profile = work.header
            profile = _collectives(rank, work, profile, reporter)
            profile, problems = _layers(rank, work, profile, reporter)
        if rank == 0:
            fmt.save(profile, work.request.options.output_path)
        dist.barrier()
        return problems
    finally:
        dist.destroy_process_group()


def _collectives(rank: int, work: Work, profile: fmt.Profile, reporter) -> fmt.Profile:
    import torch

    if not work.collectives:
        return profile
    opts = work.request.options
    topology = coll.Topology(work.world, work.ranks_per_node)
    device = torch.device("cuda", torch.cuda.current_device()) if work.device == "cuda" else torch.device("cpu")
    groups = coll.make_groups(topology, list(work.collectives), device)
    sizes = coll.message_sizes(opts.message_bytes.min, opts.message_bytes.max, opts.message_bytes.steps)
    for key in work.collectives:
        m = coll.measure(key, sizes, topology, device=device, warmup=opts.warmup, repeats=opts.repeats, groups=groups)
        reporter.step(f"{key.op} over {key.size} ranks ({key.placement.replace('_', '-')})")
        if rank == 0:
            profile = profile.with_collectives([m])
            fmt.save(profile, opts.output_path)
    return profile


def _layers(rank: int, work: Work, profile: fmt.Profile, reporter) -> tuple[fmt.Profile, list[str]]:
    import torch.distributed as dist

    from megatron.core import parallel_state

    if not work.shapes:
        return profile, []
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    if work.device == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    problems: list[str] = []
    try:
        shapes = list(work.shapes)
        rounds = -(-len(shapes) // work.world)
        for r in range(rounds):
            index = r * work.world + rank
            mine = _measure_shape(work, shapes[index]) if index < len(shapes) else None
            gathered = [None] * work.world if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if rank != 0:
                continue
            done = []
            for item in gathered:
                if item is None:
                    continue
                if isinstance(item, fmt.LayerMeasurement):
                    done.append(item)
                    reporter.step(f"layer {item.key.short()}")
                else:
                    problems.append(item)
                    reporter.step("")
            profile = profile.with_layers(done)
            fmt.save(profile, work.request.options.output_path)
    finally:
        parallel_state.destroy_model_parallel()
    return profile, problems


def _measure_shape(work: Work, key: fmt.LayerKey):
    """A measurement, or a line saying why the shape could not be measured."""
    import contextlib

    import torch

    from uniap_megatron.profile import measure
    from uniap_megatron.profile.megatron_layers import build, cpu_runtime

    opts, model = work.request.options, work.request.plan.model
    runtime = cpu_runtime() if work.device == "cpu" else contextlib.nullcontext()
    item = None
    try:
        with runtime:
            item = build(model, key, device=work.device, dtype=torch.bfloat16, layer_spec=work.layer_spec)
            timing = measure.time_item(item, device=work.device, warmup=opts.warmup, repeats=opts.repeats)
            saved = measure.saved_bytes(item, model.hidden_size)
            peak = measure.peak_bytes(item) if work.device == "cuda" else None
        return fmt.LayerMeasurement(key=key, fwd_s=timing.fwd_s, bwd_s=timing.bwd_s, saved_bytes=saved.total,
                                    seq_shardable_bytes=saved.seq_shardable, peak_bytes=peak, repeats=timing.repeats)
    except torch.OutOfMemoryError:
        return fmt.LayerMeasurement(key=key, status="oom")
    except Exception as err:  # one shape failing must not stop the others
        return f"{key.short()}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        del item
        if work.device == "cuda":
            torch.cuda.empty_cache()

