"""Peak memory and wall time of ``python -m csfm.embed`` on one long WFDB record.

Writes (once, into --dir) a synthetic record of --hours hours, --leads ECG leads at --fs Hz
in WFDB format 16, and a demo-preset checkpoint; then runs the embedding command in a fresh
Python process per variant and reports its peak resident memory (ru_maxrss) and wall time,
next to a baseline process that only imports csfm.evaluation.embedding and loads the encoder (so "above
baseline" is the memory the data path costs). ``--script PATH`` runs another embed module
file instead of csfm.evaluation.embedding (e.g. an older version from ``git show REV:csfm/embed.py``).

    python bench/embed_long_record.py --hours 10 --leads 12 --fs 500 --dir /tmp/csfm_long

Timings on a shared machine are noisy; run the variants back to back and compare there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

_MEASURE = textwrap.dedent("""
    import json, resource, runpy, sys, time
    script, argv = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    if script == "baseline":
        from csfm.evaluation.embedding import load_encoder
        load_encoder(argv[0])
    else:
        sys.argv = [script, *argv]
        if script.endswith(".py"):
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__")
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "wall_s": time.perf_counter() - started}))
""")


def write_record(directory: Path, hours: float, leads: int, fs: int) -> Path:
    """A synthetic ECG-like record ``long`` ([T, leads] int16, format 16, gain 200/mV) in directory."""
    import numpy as np
    import wfdb

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "long.hea").is_file():
        return directory
    n = int(hours * 3600 * fs)
    digital = np.empty((n, leads), np.int16)
    rng = np.random.default_rng(0)
    step = fs * 600
    for start in range(0, n, step):  # 10 min at a time, so writing stays light on memory
        t = np.arange(start, min(n, start + step)) / fs
        beat = np.sin(2 * np.pi * 1.1 * t) ** 31 + 0.2 * np.sin(2 * np.pi * 0.3 * t)
        for c in range(leads):
            noise = 0.02 * rng.standard_normal(len(t))
            digital[start:start + len(t), c] = np.round(200 * ((1 + 0.1 * c) * beat + noise))
    wfdb.wrsamp("long", fs=fs, units=["mV"] * leads, sig_name=list(LEADS[:leads]), d_signal=digital,
                fmt=["16"] * leads, adc_gain=[200.0] * leads, baseline=[0] * leads, write_dir=str(directory))
    return directory


def write_checkpoint(directory: Path) -> Path:
    """A demo-preset checkpoint (random weights) in directory/checkpoint."""
    from csfm.model.checkpoint import save_checkpoint
    from csfm.model.config import preset
    from csfm.model.pretrain import MaskedPretrainer

    checkpoint = directory / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        save_checkpoint(checkpoint, MaskedPretrainer(preset("demo")), preset("demo"))
    return checkpoint


def measure(script: str, argv: list[str]) -> dict:
    """{"peak_rss_mb", "wall_s"} of one fresh process running ``script`` with ``argv``."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, script, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=10.0)
    parser.add_argument("--leads", type=int, default=12)
    parser.add_argument("--fs", type=int, default=500)
    parser.add_argument("--dir", default="/tmp/csfm_long_record")
    parser.add_argument("--script", default="csfm.evaluation.embedding", help="module name or .py file of the embed command")
    parser.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir)
    data, checkpoint = directory / "data", directory / "checkpoint"
    if args.setup_only:
        write_record(data, args.hours, args.leads, args.fs)
        write_checkpoint(directory)
        return
    # set up in a child process: a process forked from a big parent starts with the
    # parent's resident size as its peak (Linux keeps ru_maxrss across fork and exec)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--setup-only"], check=True)
    baseline = measure("baseline", [str(checkpoint)])
    run = measure(args.script, ["--checkpoint", str(checkpoint), "--data", f"wfdb:{data}",
                                "--out", str(directory / "out.npz"), "--quiet"])
    print(f"{args.hours:g} h x {args.leads} leads at {args.fs} Hz, {args.script}: peak RSS {run['peak_rss_mb']:.0f} MB "
          f"({run['peak_rss_mb'] - baseline['peak_rss_mb']:.0f} MB above the {baseline['peak_rss_mb']:.0f} MB "
          f"baseline), wall {run['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
