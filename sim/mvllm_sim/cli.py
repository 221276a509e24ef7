"""`mvllm-sim`: a vLLM stand-in. It takes vLLM's server arguments, so mvllmd launches it as it
launches vLLM, plus its own timing, length and fault options, and reads vLLM's VLLM_API_KEY and
VLLM_SERVER_DEV_MODE from the environment. See `mvllm-sim --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import uvloop

from mvllm_sim.faults import ERROR_STATUSES, FaultConfig
from mvllm_sim.kvcheck import AUTO, KvCacheError, checked_max_model_len
from mvllm_sim.profiles import ProfileError, load_profiles, memory_modelled, reload_seconds, step_model
from mvllm_sim.server import SimConfig, SimServer
from mvllm_sim.text import LengthModel
from mvllm_sim.weights import fingerprint, is_model_checkpoint

log = logging.getLogger("mvllm_sim")
ENGINE_FAILED = ("RuntimeError: Engine core initialization failed. See root cause above. "
                 "Failed core proc(s): {'EngineCore_DP0': 1}")  # fmt: skip

EPILOG = """\
Timing: each engine step advances a simulated clock by the profile's step time; the server waits
simulated time x --time-scale in wall time (0: no waiting at all). While idle the clock follows wall
time / --time-scale (with 0 it stands still: it is the summed step times). /metrics shows it as
mvllm_sim:clock_seconds: the change of vllm:generation_tokens_total over its change between two scrapes
is tokens per simulated second at any time scale. Latencies on /metrics are in simulated seconds.

KV cache: the profile's capacity at the TP size (h100-70b derives it from the GPUs' memory, as vLLM
does). As vLLM, the server refuses to start (status 1, vLLM's message) when there is no room for a KV
cache at that TP size, or when one request of --max-model-len would not fit; --max-model-len auto
takes the longest that fits.

Faults, per request, with the header X-Mvllm-Fault: crash | hang | drop | drop-after=K | status=CODE.

Weights: a --model that is a directory with a config.json is a checkpoint; its fingerprint (a hash
of its files) tags every word the server writes, and /collective_rpc reload_weights swaps it, so a
client can tell from the text which weights made each token (mvllm_sim.weights; weights_tag in
mvllm_sim.text reads a word's tag).
With VLLM_SERVER_DEV_MODE=1, as vLLM, the development routes are served (without the API key):
/pause?mode=abort|wait|keep, /resume, /is_paused, /sleep?level=0|1|2, /wake_up, /is_sleeping,
/collective_rpc (reload_weights), /update_weight_version, /weight_info, /reset_prefix_cache.

Example: mvllm-sim --model meta-llama/Llama-3.1-8B-Instruct --port 8001 --tensor-parallel-size 2 --time-scale 0.1
         mvllm-sim --profile h100-70b -tp 2 --max-model-len auto    # 70B on two H100s: 2,736 tokens of KV
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mvllm-sim",
        description="A vLLM stand-in with continuous batching, a KV cache and fault injection, in simulated time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v = p.add_argument_group("vLLM server arguments (the same names and meaning as vLLM's)")
    v.add_argument("--model", default="mvllm-sim/h100-8b", help="Model name (nothing is loaded). [%(default)s]")
    v.add_argument("--served-model-name", nargs="+", help="Name(s) clients use; the first is reported. [--model]")
    v.add_argument("--host", default="127.0.0.1", help="Address to bind. [%(default)s]")
    v.add_argument("--port", type=int, default=8000, help="Port to bind. [%(default)s]")
    v.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="Selects the profile's TP variant.")
    v.add_argument("--max-num-seqs", type=int, help="Sequences per batch. [the profile's]")
    v.add_argument("--gpu-memory-utilization", type=float, metavar="SHARE",
                   help="Share of each GPU's memory the engine takes, where the profile models memory (its KV "
                        "cache is what is left after the weights). [the profile's, vLLM's 0.9]")  # fmt: skip
    v.add_argument("--max-num-batched-tokens", type=int, help="Tokens per step (chunked prefill). [the profile's]")
    v.add_argument("--max-model-len", type=model_len, metavar="TOKENS",
                   help="Context length; auto or -1: the longest the KV cache holds. [the profile's]")  # fmt: skip
    v.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' on /v1/*. [$VLLM_API_KEY, as vLLM]")  # fmt: skip
    s = p.add_argument_group("simulator")
    s.add_argument("--profile", default="h100-8b", help=f"Timing profile: {', '.join(load_profiles())}. [%(default)s]")
    s.add_argument("--speed", type=float, default=1.0, help="Divide every step time by this. [%(default)s]")
    s.add_argument("--time-scale", type=float, default=1.0, help="Wall seconds per simulated second. [%(default)s]")
    s.add_argument("--kv-tokens", type=int, help="KV cache capacity in tokens. [the profile's, for the TP size]")
    s.add_argument("--output-len-mu", type=float, default=5.3, help="Log-normal output length: log median. [5.3]")
    s.add_argument("--output-len-sigma", type=float, default=0.8, help="Log-normal output length: spread. [0.8]")
    s.add_argument("--reload-s", type=float, metavar="SECONDS",
                   help=f"Simulated time a weights reload takes. [the profile's: {_reload_defaults()}]")  # fmt: skip
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    f = p.add_argument_group("faults")
    f.add_argument("--crash-after-requests", type=int, metavar="K", help="Exit (status 70) when request K+1 arrives.")
    f.add_argument("--crash-at", type=float, metavar="SECONDS", help="Exit (status 70) at this simulated time.")
    f.add_argument(
        "--hang-after-requests",
        type=int,
        metavar="K",
        help="Engine stops after K requests; /health stays 200.",
    )
    f.add_argument("--drop-rate", type=float, default=0.0, help="Share of requests whose connection is cut mid-answer.")
    f.add_argument("--error-rate", type=float, default=0.0, help="Share of requests answered with --error-status.")
    f.add_argument("--error-status", type=int, default=503, choices=ERROR_STATUSES)
    f.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS", help="Not ready for this long.")
    f.add_argument("--startup-mode", default="health-503", choices=["health-503", "refuse"],
                   help="While starting: /health answers 503, or the port stays closed. [%(default)s]")  # fmt: skip
    f.add_argument("--fault-seed", type=int, default=0, help="Seed of the fault rates' random draws.")
    f.add_argument("--fail-reloads", action="store_true", help="Every weights reload fails (500), as a loader's would.")
    return p


def _reload_defaults() -> str:
    return ", ".join(f"{p['reload_s']} s for {name}" for name, p in load_profiles().items())


def model_len(value: str) -> int:
    """vLLM's --max-model-len: tokens, or -1 / auto (AUTO)."""
    return AUTO if value.strip().lower() in ("-1", "auto") else int(value)


def config_from(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> SimConfig:
    """The server's configuration from its flags and `env` (VLLM_SERVER_DEV_MODE, read as vLLM reads it:
    an integer, true unless 0). Fingerprints --model when it is a checkpoint. Raises ValueError, or its
    KvCacheError when the engine could not start (kvcheck)."""
    share = args.gpu_memory_utilization
    if share is not None and not 0 < share <= 1:
        raise ValueError("--gpu-memory-utilization must be more than 0 and at most 1")
    model = step_model(args.profile, args.tensor_parallel_size, args.speed, share)
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1 and not (name == "max_model_len" and value == AUTO):
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("drop_rate", "error_rate"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.time_scale < 0 or args.speed <= 0:
        raise ValueError("--time-scale must be >= 0 and --speed > 0")
    if args.reload_s is not None and args.reload_s < 0:
        raise ValueError("--reload-s must be >= 0")
    dev_mode = env.get("VLLM_SERVER_DEV_MODE", "0")
    if not dev_mode.strip().lstrip("+-").isdigit():
        raise ValueError(f"VLLM_SERVER_DEV_MODE must be an integer (0: off), not {dev_mode!r}")
    kv_tokens = args.kv_tokens or model.kv_tokens
    max_model_len = checked_max_model_len(args.max_model_len or model.max_model_len, kv_tokens,
                                          model.kv_bytes_per_token, model.tp, model.max_model_len)  # fmt: skip
    return SimConfig(
        model=args.model,
        served_model_name=(args.served_model_name or [args.model])[0],
        step_model=model,
        max_num_seqs=args.max_num_seqs or model.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or model.max_num_batched_tokens,
        max_model_len=max_model_len,
        kv_tokens=kv_tokens,
        time_scale=args.time_scale,
        lengths=LengthModel(args.output_len_mu, args.output_len_sigma),
        faults=FaultConfig(
            crash_after_requests=args.crash_after_requests,
            crash_at_s=args.crash_at,
            hang_after_requests=args.hang_after_requests,
            drop_rate=args.drop_rate,
            error_rate=args.error_rate,
            error_status=args.error_status,
            startup_delay_s=args.startup_delay,
            startup_mode=args.startup_mode,
            fault_seed=args.fault_seed,
            fail_reloads=args.fail_reloads,
        ),
        api_key=args.api_key,
        dev_mode=int(dev_mode) != 0,
        reload_s=reload_seconds(args.profile) if args.reload_s is None else args.reload_s,
        fingerprint=fingerprint(args.model) if is_model_checkpoint(args.model) else None,
    )


async def serve(config: SimConfig, host: str, port: int) -> None:
    server = SimServer(config)
    if config.faults.startup_mode == "refuse" and config.faults.startup_delay_s > 0:
        await asyncio.sleep(config.faults.startup_delay_s)  # the port stays closed meanwhile
    await server.start(host, port)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, server.hang)
    log.info("mvllm-sim serving %s on http://%s:%d (profile %s, TP%d, time scale %g)",
             config.served_model_name, host, port, config.step_model.name, config.step_model.tp,
             config.time_scale)  # fmt: skip
    # As vLLM's API server does once it is up (freeze_gc_heap): the startup heap is never collected
    # again, so the collector only scans what requests allocate (8% less CPU a request here).
    gc.collect()
    gc.freeze()
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> None:
    args, unknown = parser().parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if unknown:
        log.warning("ignoring vLLM options the simulator does not model: %s", " ".join(unknown))
    try:
        if args.gpu_memory_utilization is not None and not memory_modelled(args.profile):
            log.warning("--gpu-memory-utilization changes nothing with profile %s: it states its KV cache in "
                        "tokens (--kv-tokens sets it)", args.profile)  # fmt: skip
        config = config_from(args)
    except KvCacheError as exc:  # as vLLM's engine core fails, before anything listens
        print(f"ValueError: {exc}", file=sys.stderr)
        print(ENGINE_FAILED, file=sys.stderr)
        sys.exit(1)
    except (ProfileError, ValueError) as exc:
        print(f"mvllm-sim: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        uvloop.run(serve(config, args.host, args.port))  # the event loop `vllm serve` runs too
    except OSError as exc:
        print(f"mvllm-sim: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
