"""GPU benchmark: MisConv2d's paths against conv2d + ReLU, on the paper's grid and end to end.

One command on a machine with CUDA (about 2-3 minutes on one H100/H200, most of it compiling the
CPU fast path's kernels and Triton's):

    python benchmarks/bench_misconv_gpu.py --out results/timing/cuda/triton

and, on any machine, a smoke run that proves the script works (a tiny grid on the CPU, Triton's
interpreter, one or two rounds; seconds, and no figure in it means anything):

    python benchmarks/bench_misconv_gpu.py --dry-run --out /tmp/bench_gpu

Sections (each layer of a setting measured interleaved with the others, elapsed time, medians):

1. ``forward``: the paper's grid (supplementary Table 2: images of 28/32/64 px with 1/3/3 channels
   and a missing square of side I/2, batches 16/32/64, 32 filters 3x3, K = 1, L = 4), no
   gradients: conv2d+ReLU on the complete image ("conv"), MisConv's eager formula ("eager"), the
   windowed CPU fast path ("fast", torch.compile), the fused Triton path ("triton"), and CUDA-graph
   replays of conv2d+ReLU and of the Triton path ("conv_graph", "triton_graph": fixed shapes, no
   launch overhead; also the GPU's busy time of a call).
2. ``backward``: the same grid, forward + backward (gradients of the layer's weight and bias).
3. ``scale``: the forward at larger batches, where the layer may stop being launch-bound.
4. ``end_to_end``: per image, DMFA + classifier with a MisConv front (Triton / eager path)
   against the classifier on complete images (MNIST, CIFAR-10; eval mode, no gradients).
5. ``training``: one training step (forward, cross-entropy, backward, Adam) of the MNIST and
   CIFAR-10 classifiers with the MisConv front (Triton / eager path, the MFA given) against the
   same classifier with a plain conv front on complete images.

Targets checked in ``table.md`` and ``summary.csv``: the Triton path at or below the paper's ratio
(MisConv / conv on its GPU) in every cell of the grid; at most 3x conv2d+ReLU wherever the layer is
not launch-bound, i.e. where replaying its CUDA graph takes at least half the time of a call
(``busy`` = triton_graph / triton ≥ 0.5: the GPU, not the launching, sets the time).

Writes to ``--out``: ``timings.csv`` (every measured call), ``summary.csv`` (medians, ratios,
targets), ``table.md``, ``machine.json``, rewritten after every section (a run cut short keeps
what it measured). A layer that fails on its first call is left out of its setting and a section
that fails is skipped, each with the error in the table's notes (exit status 1); sections are
skipped, and say so, once ``--budget-s`` has elapsed. Without CUDA (and without ``--dry-run``) it
exits with status 2 and a message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's labkit
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PAPER_GRID = dict(sizes=(28, 32, 64), batches=(16, 32, 64))
SCALE_CASES = ((32, 256), (64, 256), (64, 1024))
DATASETS = ("mnist", "cifar10")
LAUNCH_BOUND_BUSY = 0.5       # busy (graph replay / call) below this: launch-bound
TARGET_NOT_LAUNCH_BOUND = 3.0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for timings.csv, summary.csv, table.md, machine.json")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke run: tiny settings (training on 8x8 images), Triton's interpreter, no "
                        "torch.compile, no warm-up, 1-2 rounds")
    p.add_argument("--repeats", type=int, default=100, help="interleaved rounds per forward setting")
    p.add_argument("--backward-repeats", type=int, default=50)
    p.add_argument("--scale-repeats", type=int, default=30)
    p.add_argument("--e2e-repeats", type=int, default=20)
    p.add_argument("--train-repeats", type=int, default=20)
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--sections", nargs="+", default=["forward", "backward", "scale", "end_to_end", "training"],
                   choices=["forward", "backward", "scale", "end_to_end", "training"])
    p.add_argument("--no-fast", action="store_true", help="leave out the windowed CPU path (saves its compiling)")
    p.add_argument("--budget-s", type=float, default=170.0, help="skip the remaining sections after this many seconds")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- measuring
def _graphed(fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream, as torch.cuda.graphs asks), replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


class Runner:
    def __init__(self, args, device):
        from labkit.studies import timing

        self.args, self.device, self.timing = args, device, timing
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.warmup = 0 if args.dry_run else 3
        self.failed = False

    def over_budget(self, section: str) -> bool:
        spent = time.perf_counter() - self.t0
        if spent > self.args.budget_s:
            self.notes.append(f"section {section} skipped: {spent:.0f} s spent, budget {self.args.budget_s:.0f} s")
            print(self.notes[-1], flush=True)
            return True
        return False

    def measure(self, study: str, setting: dict, fns: dict, repeats: int, per_image: int | None = None):
        """Time ``fns`` interleaved; one row per call. A function that fails on its first call
        (its first call is a warm-up) is left out, with the error in the notes."""
        t0 = time.perf_counter()
        working = {}
        for name, fn in fns.items():
            try:
                fn()
                working[name] = fn
            except Exception as exc:  # noqa: BLE001 - record it, measure the others
                self.notes.append(f"{study} {setting}: {name} failed ({type(exc).__name__}: {exc})")
                print(self.notes[-1], flush=True)
                self.failed = True
        if not working:
            return
        times = self.timing.interleaved(working, repeats, warmup=max(0, self.warmup - 1), device=self.device,
                                        clock="wall")
        for layer, ts in times.items():
            self.rows += [dict(study=study, **setting, layer=layer, round=i, seconds=s,
                               per_image=(s / per_image if per_image else math.nan)) for i, s in enumerate(ts)]
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        print(f"  {study} {setting}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    def add_graphs(self, fns: dict, names: dict[str, str]):
        """CUDA-graph versions of some forward functions (``names``: graph name -> function name)."""
        if self.device.type != "cuda":
            return
        for graph_name, name in names.items():
            try:
                fns[graph_name] = _graphed(fns[name])
            except Exception as exc:  # noqa: BLE001 - record why, measure the rest
                self.notes.append(f"{graph_name}: CUDA graph capture failed ({type(exc).__name__}: {exc})")
                print(self.notes[-1], flush=True)


# ------------------------------------------------------------------------------------- the layer
def _layer_fns(runner: Runner, case, backward: bool) -> dict:
    from labkit.misconv import MisConv2d

    dev = runner.device
    torch.manual_seed(0)
    layer = MisConv2d(case.channels, case.filters, case.kernel, padding=case.kernel // 2, device=dev)
    x, missing, mfa = runner.timing.make_inputs(case, device=dev, seed=0)
    complete = torch.nan_to_num(x, nan=0.5)
    pad = case.kernel // 2

    def conv():
        return F.relu(F.conv2d(complete, layer.weight, layer.bias, padding=pad))

    def misconv(path):
        def run():
            layer.fast = path
            return layer(x, missing, mfa)
        return run

    paths = {"eager": False, "triton": "triton"} | ({} if runner.args.no_fast else {"fast": True})
    forwards = {"conv": conv} | {name: misconv(path) for name, path in paths.items()}

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def step(f):
        def run():
            layer.zero_grad(set_to_none=True)
            out = f()
            out.backward(torch.ones_like(out))
        return run

    return {name: (step(f) if backward else no_grad(f)) for name, f in forwards.items()}


def _grid_section(runner: Runner, study: str, cases, repeats: int, backward: bool, graphs: bool):
    for case in cases:
        fns = _layer_fns(runner, case, backward)
        if graphs:
            runner.add_graphs(fns, {"conv_graph": "conv", "triton_graph": "triton"})
        runner.measure(study, case.row(), fns, repeats)


# ------------------------------------------------------------------------------------- end to end, training
def _set_path(model, path) -> None:
    from labkit.misconv import MisConv2d

    for module in model.modules():
        if isinstance(module, MisConv2d):
            module.fast = path


def _e2e_section(runner: Runner, datasets, batch: int, repeats: int):
    for name in datasets:
        case, fns = runner.timing.end_to_end_fns(name, batch, runner.device, seed=0,
                                                 paths={"method_triton": "triton", "method_eager": False})
        runner.measure("end_to_end", dict(dataset=name, size=case.size, channels=case.channels, batch=batch, K=1, L=4),
                       fns, repeats, per_image=batch)


def _training_section(runner: Runner, datasets, batch: int, repeats: int, image_size: int | None = None):
    from labkit.models.classifier import build_classifier

    dev = runner.device
    for name in datasets:
        arch, size, C = runner.timing.E2E_DATASETS[name]
        size = image_size or size
        case = runner.timing.Case(size=size, batch=batch, channels=C)
        x, missing, mfa = runner.timing.make_inputs(case, device=dev, seed=0)
        complete = torch.nan_to_num(x, nan=0.5)
        none = torch.zeros_like(missing)
        labels = torch.randint(10, (batch,), generator=torch.Generator().manual_seed(0)).to(dev)
        torch.manual_seed(0)
        models = {"gt": build_classifier(arch, "gt", in_channels=C, image_size=size).to(dev).train(),
                  "misconv": build_classifier(arch, "dmfa_misconv_complete", in_channels=C, image_size=size).to(dev).train()}
        optims = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}

        def step(key, inputs, path=None):
            model, opt = models[key], optims[key]

            def run():
                if path is not None:
                    _set_path(model, path)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(*inputs), labels)
                loss.backward()
                opt.step()
            return run

        fns = {"classifier": step("gt", (complete, none, complete)),
               "misconv_triton": step("misconv", (x, missing, mfa), "triton"),
               "misconv_eager": step("misconv", (x, missing, mfa), False)}
        runner.measure("training", dict(dataset=name, size=size, channels=C, batch=batch, K=1, L=4), fns, repeats,
                       per_image=batch)


# ------------------------------------------------------------------------------------- tables
CELL = ["study", "dataset", "size", "channels", "batch", "K", "L"]


def summarize(raw, paper):
    """One row per setting and layer: medians, the ratio to the setting's baseline (conv2d+ReLU, or the
    classifier on complete images), and for the Triton path the paper's ratio and the targets."""
    import pandas as pd

    keys = [k for k in CELL if k in raw.columns]
    raw = raw.copy()
    raw[keys] = raw[keys].fillna("-")
    g = raw.groupby(keys + ["layer"], sort=False)
    out = g.seconds.agg(n="count", median="median", q25=lambda s: s.quantile(0.25),
                        q75=lambda s: s.quantile(0.75)).reset_index()
    out["per_image_ms"] = g.per_image.median().values * 1e3
    base = out[out.layer.isin(["conv", "classifier"])].set_index(keys)["median"]
    out["ratio"] = [r["median"] / base.get(tuple(r[k] for k in keys), math.nan) for _, r in out.iterrows()]
    graph = out[out.layer == "triton_graph"].set_index(keys)["median"]
    call = out[out.layer == "triton"].set_index(keys)["median"]
    conv_graph = out[out.layer == "conv_graph"].set_index(keys)["median"]
    paper_ratio = {(int(r.size), int(r.batch)): r.paper_ratio for r in paper.itertuples()}
    extra = []
    for _, r in out.iterrows():
        key = tuple(r[k] for k in keys)
        row = dict(paper_ratio=math.nan, target_paper=None, busy=math.nan, launch_bound=None, graph_ratio=math.nan,
                   target_3x=None)
        if r.layer == "triton":
            if r.study == "forward" and r.K == 1 and r.L == 4:
                row["paper_ratio"] = paper_ratio.get((int(r["size"]), int(r.batch)), math.nan)
                if not math.isnan(row["paper_ratio"]):
                    row["target_paper"] = bool(r.ratio <= row["paper_ratio"])
            if key in graph.index and key in call.index:
                row["busy"] = graph[key] / call[key]
                row["launch_bound"] = bool(row["busy"] < LAUNCH_BOUND_BUSY)
                if key in conv_graph.index:
                    row["graph_ratio"] = graph[key] / conv_graph[key]
                if not row["launch_bound"]:
                    row["target_3x"] = bool(r.ratio <= TARGET_NOT_LAUNCH_BOUND)
        extra.append(row)
    return pd.concat([out, pd.DataFrame(extra)], axis=1)


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if type(v).__name__ in ("bool", "bool_"):
        return "yes" if v else "**no**"
    return f"{v:.{digits}f}"


def markdown(summary, header: list[str], notes: list[str]) -> str:
    lines = list(header)
    s = summary

    def cell_rows(study):
        return s[s.study == study]

    def layer_table(study, title, layers, with_targets):
        d = cell_rows(study)
        if d.empty:
            return
        present = [la for la in layers if la in set(d.layer)]
        lines.extend(["", f"### {title}", ""])
        head = ["I", "C", "B"] + [f"{la} ms" for la in present] + [f"{la} / conv" for la in present if la != "conv"]
        if with_targets:
            head += ["paper (GPU)", "triton ≤ paper", "busy", "launch-bound", "triton ≤ 3x (not launch-bound)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for key, cell in d.groupby(["size", "channels", "batch"], sort=False):
            by = cell.set_index("layer")
            vals = [str(key[0]), str(key[1]), str(key[2])]
            get = lambda la, col: by.loc[la, col] if la in by.index else math.nan  # noqa: E731
            vals += [_fmt(get(la, "median") * 1e3) for la in present]
            vals += [("**" + _fmt(get(la, "ratio"), 2) + "**") if la == "triton" else _fmt(get(la, "ratio"), 2)
                     for la in present if la != "conv"]
            if with_targets:
                t = by.loc["triton"] if "triton" in by.index else None
                vals += [_fmt(t.paper_ratio, 2), _fmt(t.target_paper), _fmt(t.busy, 2), _fmt(t.launch_bound),
                         _fmt(t.target_3x)] if t is not None else ["–"] * 5
            lines.append("| " + " | ".join(vals) + " |")

    fwd_layers = ["conv", "eager", "fast", "triton", "conv_graph", "triton_graph"]
    layer_table("forward", "Forward, the paper's grid (K = 1, L = 4; ms per call, medians)", fwd_layers, True)
    layer_table("backward", "Forward + backward (weight and bias gradients)", ["conv", "eager", "fast", "triton"], False)
    layer_table("scale", "Forward at larger batches", fwd_layers, True)
    for study, title in (("end_to_end", "End to end, per image (eval, no gradients)"),
                         ("training", "One training step (forward, backward, Adam), per image")):
        d = cell_rows(study)
        if d.empty:
            continue
        lines.extend(["", f"### {title}", "", "| data | B | layer | ms per image | ratio to the classifier |",
                      "|---|---|---|---|---|"])
        for r in d.itertuples():
            lines.append(f"| {r.dataset} | {r.batch} | {r.layer} | {_fmt(r.per_image_ms, 4)} | {_fmt(r.ratio, 2)} |")
    f = s[(s.study == "forward") & (s.layer == "triton")]
    paper_cells = f[f.target_paper.notna()]
    checked = s[(s.layer == "triton") & s.target_3x.notna()]
    lines.extend(["", "### Targets", "",
                  f"- Triton at or below the paper's ratio: {int(paper_cells.target_paper.sum())} of {len(paper_cells)} cells.",
                  f"- Triton at most {TARGET_NOT_LAUNCH_BOUND:g}x conv2d+ReLU where not launch-bound (busy ≥ "
                  f"{LAUNCH_BOUND_BUSY:g}): {int(checked.target_3x.sum())} of {len(checked)} such settings."])
    if notes:
        lines.extend(["", "Notes:"] + [f"- {n}" for n in notes])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = _parse(argv)
    if args.dry_run:
        # before any Triton kernel is wrapped: the interpreter runs them on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures MisConv2d on a GPU. Run it on a machine with CUDA, "
              "or with --dry-run for a CPU smoke test.", file=sys.stderr)
        return 2
    from labkit import misconv_fast
    from labkit import misconv_triton as MT
    from labkit.studies import timing

    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        misconv_fast._COMPILE = False         # the fast path uncompiled: no minutes of torch.compile
        torch.set_num_threads(1)
        args.repeats = args.backward_repeats = args.scale_repeats = 2
        args.e2e_repeats = args.train_repeats = 1
        args.e2e_batch = args.train_batch = 2
        grid = [timing.Case(size=8, batch=2, channels=1), timing.Case(size=8, batch=3, channels=3)]
        scale = [timing.Case(size=8, batch=4)]
    else:
        grid = timing.grid_cases(PAPER_GRID["sizes"], PAPER_GRID["batches"])
        scale = [timing.Case(size=s, batch=b) for s, b in SCALE_CASES]
    if not MT.available():
        print(f"the Triton path cannot run here: {MT.unsupported(device, torch.zeros(1, 1, 1, 1), (0, 0))}",
              file=sys.stderr)
        return 2
    machine = timing.machine_description(device) | {
        "triton": __import__("triton").__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "tf32_convolutions": torch.backends.cudnn.allow_tf32, "dry_run": args.dry_run}
    print("machine:", json.dumps(machine), flush=True)
    runner = Runner(args, device)
    plan = {"forward": lambda: _grid_section(runner, "forward", grid, args.repeats, backward=False, graphs=True),
            "backward": lambda: _grid_section(runner, "backward", grid, args.backward_repeats, backward=True,
                                              graphs=False),
            "scale": lambda: _grid_section(runner, "scale", scale, args.scale_repeats, backward=False, graphs=True),
            "end_to_end": lambda: _e2e_section(runner, DATASETS, args.e2e_batch, args.e2e_repeats),
            "training": lambda: _training_section(runner, DATASETS, args.train_batch, args.train_repeats,
                                                  8 if args.dry_run else None)}
    command = "python benchmarks/bench_misconv_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    failed = False
    for name, run in plan.items():
        if name not in args.sections or runner.over_budget(name):
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - keep what was measured, say what broke
            traceback.print_exc()
            runner.notes.append(f"section {name} failed: {type(exc).__name__}: {exc}")
            failed = True
        # written after every section: a run stopped by a time limit keeps what it measured
        _report(args, runner, machine, command, timing.paper_table(), final=False)
    _report(args, runner, machine, command, timing.paper_table(), final=True)
    return 1 if failed or runner.failed else 0


def _report(args, runner: Runner, machine: dict, command: str, paper, final: bool) -> None:
    import pandas as pd

    wall = time.perf_counter() - runner.t0
    header = [f"## MisConv2d on {machine.get('gpu') or machine['device']}" + (" (dry run: CPU, interpreter, "
              "tiny settings; the figures mean nothing)" if args.dry_run else ""),
              "", f"`{command}` — {machine['time']}, torch {machine['torch']}, triton {machine['triton']}, "
              f"CUDA {machine['cuda']}, TF32 convolutions {machine['tf32_convolutions']}; elapsed time, "
              f"medians of interleaved rounds (forward {args.repeats}, backward {args.backward_repeats}, scale "
              f"{args.scale_repeats}, end to end {args.e2e_repeats}, training {args.train_repeats}); "
              f"{wall:.0f} s{' in all' if final else ' so far (incomplete)'}."]
    raw = pd.DataFrame(runner.rows)
    summary = summarize(raw, paper) if len(raw) else pd.DataFrame()
    table = markdown(summary, header, runner.notes) if len(raw) else "\n".join(header + [""] + runner.notes) + "\n"
    if final:
        print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        raw.to_csv(out / "timings.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "table.md").write_text(table)
        (out / "machine.json").write_text(json.dumps(machine | {"wall_seconds": round(wall, 1), "complete": final,
                                                                "notes": runner.notes}, indent=1))
        if final:
            print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
