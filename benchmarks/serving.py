"""Serving benchmark: one vLLM server per attention backend, vLLM's own ``bench serve`` against it.

For each backend in turn: start ``kvfold serve`` (vLLM's ``vllm serve``) at a real model shape with
dummy weights, read vLLM's KV capacity line, run each workload with ``kvfold bench serve`` (vLLM's
``vllm bench serve``, random prompts, ``--ignore-eos``) while polling the server's ``/metrics``,
stop the server (the whole process group), wait until the GPU memory is free, go on. The result
JSON is rewritten after every step, so a run cut short keeps what it measured; every server and
client writes its own log file.

    python -m benchmarks.serving --model llama-3.1-8b --backends FLASH_ATTN,KVFOLD_TREEKV_2048 \\
        --workloads long --time-budget 420 --out OUT.json --log-dir LOGS

See docs/benchmarks.md for the commands used on the GPU machine and what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import backends as registry
from benchmarks import env_info
from benchmarks.model_dirs import load_config, model_names, prepare, write_shape_codebooks
from benchmarks.results import (
    BackendResult,
    Capacity,
    ServerStats,
    ServingRun,
    WorkloadResult,
    save,
    vllm_metrics,
)
from benchmarks.server_metrics import MetricsPoller
from benchmarks.workloads import DEFAULT_WORKLOADS, Workload, parse_workload
from kvfold.serving import Server

REPO = Path(__file__).resolve().parent.parent
# Room left in --max-model-len above a workload's longest request: vLLM's random dataset can come
# out a few tokens long after decoding and re-encoding a prompt.
LENGTH_SLACK = 64
# Seconds kept back from the time budget for stopping a server after its last workload.
STOP_RESERVE_S = 30.0
MIN_WORKLOAD_S = 30.0
MIN_START_S = 60.0
# Start-up log lines worth keeping in the result (which backend and kernel vLLM really used).
LOG_LINES = re.compile(
    r"non-default args|Using \S* ?backend|Using AttentionBackendEnum|FlashAttention version|"
    r"KV cache size|sliding.window|setting cudagraph_mode|Traceback|Error", re.IGNORECASE)

# While serving: vLLM's stat logger (every ~10 s) and kvfold's warnings (plain lines, prefixed by
# vLLM with the process name).
RUNTIME_LOG_LINES = re.compile(r"Avg prompt throughput|\bkvfold: ")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", choices=model_names(),
                   help="model shape (benchmarks/models/NAME/config.json); default %(default)s")
    p.add_argument("--model-dir", type=Path,
                   help="serve this Hugging Face directory instead of preparing --model's config")
    p.add_argument("--backends", default=",".join(registry.DEFAULT_BACKENDS),
                   help="comma-separated, run in this order (see benchmarks/backends.py; other "
                        "names are passed as --attention-backend NAME); default %(default)s")
    p.add_argument("--reference", default=registry.REFERENCE_BACKEND,
                   help="backend the ratios divide by; default %(default)s")
    p.add_argument("--workloads", default="long,long_decode,mixed,short",
                   help="comma-separated names, or 'none' to measure capacity only")
    p.add_argument("--workload", action="append", default=[], metavar="SPEC",
                   help="define or change a workload: NAME:in=I,out=O,n=N[,conc=C][,in_ratio=R]"
                        "[,out_ratio=R] (repeatable)")
    p.add_argument("--workloads-for", default="",
                   help="comma-separated backends that run the workloads; the others only start "
                        "(KV capacity and start-up time). Default: every backend")
    p.add_argument("--num-prompts-scale", type=float, default=1.0,
                   help="multiply every workload's prompt count (at least 1 each)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; what no longer fits is recorded as skipped")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--start-retries", type=int, default=1,
                   help="starts that hang past --startup-timeout are retried this often")
    p.add_argument("--workload-timeout", type=float, default=900.0)
    p.add_argument("--warmup-start", action="store_true",
                   help="first a throwaway start of a 2-layer copy of the model (the first vLLM "
                        "start on a fresh GPU machine was seen to hang), killed after it answers "
                        "or after --warmup-timeout")
    p.add_argument("--warmup-timeout", type=float, default=150.0)
    p.add_argument("--out", type=Path, help="result JSON; default docs/benchmarks/serving-MODEL.json")
    p.add_argument("--append", action="store_true",
                   help="keep the backends already in --out (same model, server arguments, "
                        "reference and device, else refused): one comparison over several commands")
    p.add_argument("--log-dir", type=Path, help="server and client logs; default OUT's name + -logs")
    server = p.add_argument_group("server arguments (every backend)")
    server.add_argument("--dtype", default="bfloat16")
    server.add_argument("--max-model-len", type=int, default=32768)
    server.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    server.add_argument("--max-num-batched-tokens", type=int, default=1024,
                        help="TreeKV's window accounting adds this to each request's blocks")
    server.add_argument("--max-num-seqs", type=int, default=256)
    server.add_argument("--load-format", default="dummy")
    server.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile / CUDA graphs (starts much faster)")
    server.add_argument("--treekv-positions", default="original", choices=["original", "rank"])
    server.add_argument("--vqkv-codebooks", type=Path,
                        help="KVFOLD_VQKV codebooks (default: MODEL_DIR/vqkv_codebooks; written with "
                             "random codewords of the model's shape when the weights are dummy)")
    server.add_argument("--fourier-dims", type=Path,
                        help="KVFOLD_FOURIER dims (default: MODEL_DIR/fourier_dims; chosen at random in "
                             "the paper's proportions when the weights are dummy)")
    server.add_argument("--extra-server-args", default="", help="appended to every server (shlex)")
    p.add_argument("--extra-bench-args", default="", help="appended to every vllm bench serve (shlex)")
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--progress-interval", type=float, default=15.0)
    args = p.parse_args(argv)
    args.out = args.out or REPO / "docs" / "benchmarks" / f"serving-{args.model}.json"
    args.log_dir = args.log_dir or args.out.with_name(args.out.stem + "-logs")
    return args


def common_server_args(args: argparse.Namespace) -> list[str]:
    common = [
        "--load-format", args.load_format, "--dtype", args.dtype,
        "--max-model-len", str(args.max_model_len),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--no-enable-prefix-caching",  # TreeKV refuses it; off for every backend alike
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs),
    ]
    if args.enforce_eager:
        common.append("--enforce-eager")
    return common


def select_workloads(args: argparse.Namespace) -> dict[str, Workload]:
    """The workloads to run, scaled, each checked to fit --max-model-len (before any GPU time)."""
    defined = dict(DEFAULT_WORKLOADS)
    for spec in args.workload:
        name, workload = parse_workload(spec)
        defined[name] = workload
    names = [] if args.workloads.strip() in ("", "none") else args.workloads.split(",")
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; defined: {sorted(defined)}")
    chosen = {n: defined[n].scaled(args.num_prompts_scale) for n in names}
    for name, wl in chosen.items():
        if wl.longest_request() + LENGTH_SLACK > args.max_model_len:
            raise SystemExit(f"workload {name}: up to {wl.longest_request()} tokens per request "
                             f"(+{LENGTH_SLACK} slack) does not fit --max-model-len {args.max_model_len}")
    return chosen


@dataclass
class Context:
    args: argparse.Namespace
    model_dir: Path
    config: dict
    run: ServingRun
    started: float = field(default_factory=time.monotonic)
    server: Server | None = None
    client: subprocess.Popen | None = None
    last_progress: float = 0.0
    gpu_memory_baseline_mib: float = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        budget = self.args.time_budget
        return float("inf") if budget is None else budget - self.elapsed()

    def save(self) -> None:
        self.run.elapsed_s = round(self.elapsed(), 1)
        save(self.run, self.args.out)

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)


class BenchServer(Server):
    """kvfold's Server, stopping sooner: a start that hung does not answer SIGINT, and the 60 s
    that Server waits by default before SIGKILL (of the whole group) is device time lost."""

    def stop(self, timeout: float = 10.0) -> int | None:
        return super().stop(timeout)


def start_server(ctx: Context, name: str, server_args: list[str], log_path: Path,
                 timeout: float, model_dir: Path | None = None) -> tuple[Server | None, str, float]:
    """Start one server; returns (server or None, status "ok"/"timeout"/"failed" + reason, seconds)."""
    server = BenchServer(model_dir or ctx.model_dir, server_args, log_path, startup_timeout=timeout)
    ctx.server = server
    t0 = time.monotonic()
    try:
        server.__enter__()  # stops the whole process group itself on failure
    except TimeoutError:
        ctx.server = None
        return None, f"timeout: not ready after {timeout:.0f}s (see {log_path})", time.monotonic() - t0
    except RuntimeError as exc:
        ctx.server = None
        return None, f"failed: {_error_line(str(exc))} (see {log_path})", time.monotonic() - t0
    return server, "ok", time.monotonic() - t0


def file_stem(name: str) -> str:
    """``SLIDING_WINDOW_2048:CPU_ATTN`` -> ``SLIDING_WINDOW_2048-CPU_ATTN`` (plain file names only:
    the GPU machine's output folder does not bring back names with other characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _error_line(text: str) -> str:
    """The last line of a log tail that names an error (the tail itself is mostly traceback)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"Error|Exception|error:", line):
            return line[:500]
    return lines[-1][:500] if lines else ""


def stop_server(ctx: Context, server: Server) -> tuple[int | None, list[int], float | None]:
    code = server.stop(timeout=30)
    ctx.server = None
    return code, server.stragglers, wait_for_gpu_memory(ctx)


def wait_for_gpu_memory(ctx: Context) -> float | None:
    """The next server measures free memory at start-up: wait until the last one's is released
    (back to within 1 GiB of what was in use before the first server)."""
    return env_info.wait_for_gpu_memory(below_mib=ctx.gpu_memory_baseline_mib + 1024, timeout=60)


def warmup(ctx: Context) -> dict:
    """A throwaway start of a 2-layer copy of the model; the real runs come after it."""
    args = ctx.args
    model_dir = args.log_dir / "warmup-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for item in ctx.model_dir.iterdir():  # tokenizer files as they are, config with 2 layers
        if item.is_file() and item.name != "config.json" and not item.name.endswith(".safetensors"):
            (model_dir / item.name).write_bytes(item.read_bytes())
    (model_dir / "config.json").write_text(json.dumps({**ctx.config, "num_hidden_layers": 2}))
    server_args = [
        "--load-format", "dummy", "--dtype", args.dtype, "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.3", "--enforce-eager", "--no-enable-prefix-caching",
        *registry.server_args(args.reference, ctx.config, args.treekv_positions, args.vqkv_codebooks,
                              args.fourier_dims),
        *shlex.split(args.extra_server_args),
    ]
    timeout = min(args.warmup_timeout, max(ctx.remaining(), 1.0))
    ctx.log(f"warm-up start (timeout {timeout:.0f}s)")
    server, status, seconds = start_server(ctx, "warmup", server_args, args.log_dir / "warmup.server.log",
                                           timeout, model_dir=model_dir)
    result: dict = {"status": status, "seconds": round(seconds, 1)}
    if server is not None:
        result["exit_code"], result["stragglers"], result["gpu_memory_after_stop_mib"] = stop_server(ctx, server)
    else:
        result["gpu_memory_after_stop_mib"] = wait_for_gpu_memory(ctx)
    ctx.log(f"warm-up: {status.splitlines()[0]} after {seconds:.0f}s")
    return result


def bench_command(ctx: Context, server: Server, workload: Workload, result_dir: Path,
                  result_name: str) -> list[str]:
    return [
        sys.executable, "-m", "kvfold", "bench", "serve",
        "--backend", "vllm", "--base-url", server.url,
        "--model", str(ctx.model_dir), "--tokenizer", str(ctx.model_dir),
        *workload.bench_args(),
        "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", result_name,
        *shlex.split(ctx.args.extra_bench_args),
    ]


def run_workload(ctx: Context, server: Server, backend: str, name: str, workload: Workload) -> WorkloadResult:
    args = ctx.args
    budget = ctx.remaining() - STOP_RESERVE_S
    if budget < MIN_WORKLOAD_S:
        return WorkloadResult(workload=workload, status="skipped", reason="time budget spent")
    timeout = min(args.workload_timeout, budget)
    stem = f"{file_stem(backend)}.{file_stem(name)}"
    bench_log, bench_json = args.log_dir / f"{stem}.bench.log", args.log_dir / f"{stem}.bench.json"
    bench_json.unlink(missing_ok=True)
    command = bench_command(ctx, server, workload, args.log_dir, bench_json.name)
    result = WorkloadResult(workload=workload, status="failed", bench_log=str(bench_log))

    def progress(sample: dict[str, float]) -> None:
        if time.monotonic() - ctx.last_progress >= args.progress_interval:
            ctx.last_progress = time.monotonic()
            ctx.log(f"{stem}: running {sample.get('vllm:num_requests_running', 0):.0f}, waiting "
                    f"{sample.get('vllm:num_requests_waiting', 0):.0f}, KV use "
                    f"{100 * sample.get('vllm:kv_cache_usage_perc', 0):.0f}%, generated "
                    f"{sample.get('vllm:generation_tokens_total', 0):.0f} tokens, done "
                    f"{sample.get('vllm:request_success_total', 0):.0f} requests")

    ctx.log(f"{stem}: {workload.num_prompts} prompts of {workload.input_len} tokens, "
            f"{workload.output_len} out (timeout {timeout:.0f}s)")
    t0 = time.monotonic()
    with open(bench_log, "w") as log, MetricsPoller(server.url, args.poll_interval, progress) as poller:
        log.write(shlex.join(command) + "\n")
        log.flush()
        ctx.client = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            code = ctx.client.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(ctx.client.pid, signal.SIGKILL)
            ctx.client.wait()
            code = None
        ctx.client = None
    result.wall_s = round(time.monotonic() - t0, 1)
    result.server = poller.stats()
    if code is None:
        result.status, result.reason = "timeout", f"client killed after {timeout:.0f}s"
    elif code != 0 or not bench_json.is_file():
        tail = bench_log.read_text(errors="replace").splitlines()[-8:]
        result.reason = f"vllm bench serve exited {code}: " + " | ".join(tail)
    else:
        result.bench_json = str(bench_json)
        result.vllm = vllm_metrics(json.loads(bench_json.read_text()))
        if result.vllm.get("completed"):
            result.status = "ok"
        else:
            result.reason = "no request completed"
    if server.process is not None and server.process.poll() is not None:
        result.reason = (result.reason or "") + f" (server exited {server.process.returncode})"
    ctx.log(f"{stem}: {result.status} in {result.wall_s}s; " + summary(result))
    return result


def summary(result: WorkloadResult) -> str:
    v, s = result.vllm, result.server
    parts = []
    if v.get("output_throughput") is not None:
        parts.append(f"output {v['output_throughput']:.0f} tok/s, TTFT median "
                     f"{v.get('median_ttft_ms', 0):.0f} ms, TPOT median {v.get('median_tpot_ms', 0):.1f} ms")
    if s is not None and s.max_running is not None:
        parts.append(f"server: max running {s.max_running:.0f}, output {s.output_tok_per_s or 0:.0f} tok/s")
    if s is not None and s.max_kv_cache_usage is not None:
        parts.append(f"peak KV use {s.max_kv_cache_usage:.0%} ({kv_bound_label(s)})")
    return "; ".join(parts) or (result.reason or "")


def kv_bound_label(stats: ServerStats) -> str:
    return {True: "KV-bound", False: "not KV-bound", None: "KV use not polled"}[stats.kv_bound()]


def run_backend(ctx: Context, name: str, workloads: dict[str, Workload], common: list[str]) -> None:
    args = ctx.args
    # The extra args last, so they can override the ones before (argparse keeps the last value).
    server_args = [*common, *registry.server_args(name, ctx.config, args.treekv_positions,
                                              args.vqkv_codebooks, args.fourier_dims),
                   *shlex.split(args.extra_server_args)]
    result = BackendResult(name=name, server_args=server_args, status="failed")
    ctx.run.backends[name] = result
    server = None
    for attempt in range(1 + max(args.start_retries, 0)):
        if ctx.remaining() < MIN_START_S:
            result.status, result.reason = "skipped", "time budget spent"
            break
        timeout = min(args.startup_timeout, ctx.remaining() - STOP_RESERVE_S)
        suffix = "" if attempt == 0 else f".{attempt}"
        log_path = args.log_dir / f"{file_stem(name)}.server{suffix}.log"
        ctx.log(f"{name}: starting (attempt {attempt + 1}, timeout {timeout:.0f}s): vllm serve "
                + shlex.join(server_args))
        result.start_attempts = attempt + 1
        result.server_log = str(log_path)
        server, status, seconds = start_server(ctx, name, server_args, log_path, timeout)
        if server is not None:
            result.status, result.reason, result.startup_s = "ok", None, round(seconds, 1)
            break
        result.status, result.reason = ("timeout" if status.startswith("timeout") else "failed"), status
        ctx.log(f"{name}: {status.splitlines()[0]}")
        result.gpu_memory_after_stop_mib = wait_for_gpu_memory(ctx)
        if result.status == "failed":
            break  # a crash repeats itself; only hangs are retried
    if server is None:
        result.backend_log_lines = _log_lines(Path(result.server_log)) if result.server_log else []
        for wl_name, wl in workloads.items():
            result.workloads[wl_name] = WorkloadResult(workload=wl, status="skipped",
                                                       reason=f"server {result.status}")
        ctx.save()
        return
    try:
        result.backend_log_lines = _log_lines(server.log_path)
        try:
            cap = server.capacity()
            result.capacity = Capacity(kv_tokens=cap.tokens, max_model_len=cap.max_model_len,
                                       max_concurrency=cap.max_concurrency)
        except RuntimeError as exc:
            result.reason = str(exc)
        ctx.log(f"{name}: ready in {result.startup_s}s; " + (
            f"KV {result.capacity.kv_tokens:,} tokens, max concurrency {result.capacity.max_concurrency}x "
            f"at {result.capacity.max_model_len:,}" if result.capacity else "no capacity line"))
        ctx.save()
        for wl_name, wl in workloads.items():
            if server.process is not None and server.process.poll() is not None:
                result.workloads[wl_name] = WorkloadResult(workload=wl, status="skipped",
                                                           reason="server exited")
                continue
            result.workloads[wl_name] = run_workload(ctx, server, name, wl_name, wl)
            ctx.save()
    finally:
        result.exit_code, result.stragglers, result.gpu_memory_after_stop_mib = stop_server(ctx, server)
        result.runtime_log_lines = _runtime_log_lines(server.log_path)
        ctx.log(f"{name}: stopped (exit {result.exit_code}, stragglers {result.stragglers}, "
                f"GPU memory after {result.gpu_memory_after_stop_mib} MiB)")
        ctx.save()


def _log_lines(path: Path, limit: int = 30) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:400] for line in lines if LOG_LINES.search(line)][:limit]


def _runtime_log_lines(path: Path, limit: int = 240) -> list[str]:
    """The last ``limit`` of the server's throughput lines and kvfold warnings."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:400] for line in lines if RUNTIME_LOG_LINES.search(line)][-limit:]


def _install_signal_handlers(ctx: Context) -> None:
    """On SIGTERM/SIGHUP (e.g. ``timeout``): SIGKILL the server's and the client's process groups
    at once, so no engine keeps the GPU's memory, note it in the result file and exit at once
    (no graceful stops or memory waits: whoever sent the signal may not wait long)."""

    def handler(signum: int, frame: object) -> None:
        for proc in (ctx.client, ctx.server.process if ctx.server else None):
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        ctx.log(f"signal {signum}: killed the server and client groups, exiting")
        ctx.run.interrupted = f"signal {signum} after {ctx.elapsed():.0f}s"
        try:  # the handler runs in the main thread, which never resumes: no concurrent write
            ctx.save()
        finally:
            os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    registry.validate(names)
    stray = {n for n in args.workloads_for.split(",") if n} - set(names)
    if stray:
        raise SystemExit(f"--workloads-for names backends not in --backends: {sorted(stray)}")
    workloads = select_workloads(args)
    if args.max_num_batched_tokens < args.max_num_seqs:  # vLLM refuses it at start-up
        raise SystemExit("--max-num-batched-tokens must be at least --max-num-seqs")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = (args.model_dir or prepare(args.model, args.log_dir / "model")).resolve()
    config = load_config(model_dir)
    if "KVFOLD_VQKV" in names:
        args.vqkv_codebooks = (args.vqkv_codebooks or model_dir / "vqkv_codebooks").resolve()
        if not (args.vqkv_codebooks / "vqkv.json").is_file():
            if args.load_format != "dummy":
                raise SystemExit(f"no VQKV codebooks at {args.vqkv_codebooks}: run `kvfold calibrate vqkv`")
            write_shape_codebooks(config, args.vqkv_codebooks)
    if "KVFOLD_FOURIER" in names:
        from kvfold.attention_backends.fourier import calibrate as fourier

        args.fourier_dims = (args.fourier_dims or model_dir / "fourier_dims").resolve()
        if not (args.fourier_dims / fourier.FILE).is_file():
            if args.load_format != "dummy":
                raise SystemExit(f"no Fourier dims at {args.fourier_dims}: run `kvfold calibrate fourier`")
            fourier.write(fourier.random_dims(model_dir, seed=0), args.fourier_dims)
    common = common_server_args(args)
    run = ServingRun(
        model=args.model if args.model_dir is None else str(args.model_dir), model_dir=str(model_dir),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=[sys.executable, *sys.argv],
        common_server_args=common + shlex.split(args.extra_server_args), reference=args.reference, time_budget_s=args.time_budget,
    )
    ctx = Context(args=args, model_dir=model_dir, config=config, run=run)
    _install_signal_handlers(ctx)
    ctx.log(f"backends {names}; workloads {list(workloads)}; results -> {args.out}; logs -> {args.log_dir}")
    run.environment = env_info.collect()
    ctx.gpu_memory_baseline_mib = env_info.gpu_memory_used_mib() or 0.0
    run.environment["gpu_memory_used_at_start_mib"] = ctx.gpu_memory_baseline_mib
    if args.append and args.out.is_file():
        from benchmarks.results import append_to, load

        ctx.run = run = append_to(load(args.out), run)
        ctx.log(f"appending to {args.out}: keeps {sorted(run.backends)}")
    ctx.log(f"environment: {run.environment.get('device', 'no CUDA device')}, vllm {run.environment.get('vllm')}, "
            f"torch {run.environment.get('torch')}")
    ctx.save()
    if args.warmup_start:
        run.warmup = warmup(ctx)
        ctx.save()
    workloads_for = {n for n in args.workloads_for.split(",") if n}
    for name in names:
        run_backend(ctx, name, workloads if not workloads_for or name in workloads_for else {}, common)
    ctx.save()
    print_table(run)
    return 0


def print_table(run: ServingRun) -> None:
    print("\nbackend                 status   KV tokens  max conc.  startup s  workload: output tok/s (x ref)")
    for name, b in run.backends.items():
        cap = b.capacity
        ratio = run.ratios.get(name, {})
        wls = []
        for wl_name, wl in b.workloads.items():
            out = wl.vllm.get("output_throughput")
            r = ratio.get("workloads", {}).get(wl_name, {}).get("output_throughput")
            bound = wl.server.kv_bound() if wl.server is not None else None
            wls.append(f"{wl_name}: " + (f"{out:.0f}" if isinstance(out, (int, float)) else wl.status)
                       + (f" (x{r:.2f})" if r else "") + {True: " KV-bound", False: " not KV-bound",
                                                          None: ""}[bound])
        print(f"{name:23s} {b.status:8s} {cap.kv_tokens if cap else '-':>10} "
              f"{cap.max_concurrency if cap else '-':>9} {b.startup_s or '-':>10}  " + ", ".join(wls))


if __name__ == "__main__":
    sys.exit(main())
