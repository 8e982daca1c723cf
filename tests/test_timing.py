"""labkit.studies.timing: the measuring core, the tables against the paper, the study of a TimingConfig,
the CLI and notebook 04."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import labkit.misconv_fast as MF
from labkit.studies import timing
from labkit.studies.configs import TimingConfig


def test_paper_table_holds_supplementary_table_2():
    paper = timing.paper_table()
    assert len(paper) == 9 and set(paper["size"]) == {28, 32, 64} and set(paper["batch"]) == {16, 32, 64}
    assert (paper.hole == paper["size"] // 2).all()
    # the paper's own range of ratios, 2.6x to 6.9x
    assert paper.paper_ratio.min() == pytest.approx(0.00091 / 0.00034)
    assert paper.paper_ratio.max() == pytest.approx(0.00138 / 0.00020)


def test_case_defaults_and_validation():
    c = timing.Case(size=28, batch=16)
    assert (c.channels, c.hole, c.K, c.L, c.filters, c.kernel) == (1, 14, 1, 4, 32, 3)
    assert timing.Case(size=64, batch=2).channels == 3
    with pytest.raises(ValueError, match="Case.batch must be a positive int, got 0"):
        timing.Case(size=28, batch=0)
    with pytest.raises(ValueError, match="Case.L must be an int >= 0"):
        timing.Case(size=28, batch=1, L=-1)
    with pytest.raises(ValueError, match=r"Case.hole must be an int in \[0, size=8\]"):
        timing.Case(size=8, batch=1, hole=9)
    cases = timing.grid_cases([28, 32], [16, 64])
    assert [(c.size, c.batch, c.channels) for c in cases] == [(28, 16, 1), (28, 64, 1), (32, 16, 3), (32, 64, 3)]


def test_make_inputs_squares_nan_and_mfa():
    case = timing.Case(size=12, batch=5, K=2, L=3)                     # 12 px: 3 channels
    x, missing, mfa = timing.make_inputs(case, device="cpu", seed=3)
    assert x.shape == (5, 3, 12, 12) and missing.shape == (5, 1, 12, 12) and missing.dtype == torch.bool
    assert (missing.sum((1, 2, 3)) == 36).all()                       # a 6x6 square per image
    J = missing.expand_as(x)
    assert torch.isnan(x[J]).all() and torch.isfinite(x[~J]).all()
    assert mfa.factors.shape == (5, 2, 3, 3, 12, 12) and torch.allclose(mfa.weights.sum(1), torch.ones(5))
    x2, missing2, _ = timing.make_inputs(case, device="cpu", seed=3)
    assert torch.equal(missing, missing2) and torch.equal(x.nan_to_num(), x2.nan_to_num())


def test_interleaved_counts_rotates_and_validates():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    out = timing.interleaved(fns, 3, warmup=1, device="cpu", clock="wall")
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(s >= 0 for v in out.values() for s in v)
    timed = order[3:]                                                 # after one warm-up call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        timing.interleaved(fns, 0)
    with pytest.raises(ValueError, match="clock must be"):
        timing.interleaved(fns, 1, clock="sundial")


def test_cpu_clock_ignores_time_spent_sleeping():
    import time

    out = timing.interleaved({"sleep": lambda: time.sleep(0.02)}, 2, warmup=0, device="cpu", clock="cpu", num_threads=1)
    assert max(out["sleep"]) < 0.01
    out = timing.interleaved({"sleep": lambda: time.sleep(0.02)}, 2, warmup=0, device="cpu", clock="wall")
    assert min(out["sleep"]) >= 0.02


def _synthetic(conv_times, mis_times, size=28, batch=16, K=1, L=4):
    rows = []
    for layer, ts in (("conv", conv_times), ("misconv", mis_times)):
        rows += [dict(study="forward", size=size, channels=1, batch=batch, K=K, L=L, hole=size // 2, layer=layer,
                      group="fast", round=i, seconds=s) for i, s in enumerate(ts)]
    return pd.DataFrame(rows)


def test_ratio_table_computes_medians_floor_and_joins_the_paper():
    df = pd.concat([_synthetic([1.0, 2.0, 3.0], [4.0, 10.0, 6.0]), _synthetic([1.0, 1.0], [3.0, 3.0], L=1, batch=32)])
    t = timing.ratio_table(df)
    r = t[t.L == 4].iloc[0]
    assert r.ratio == pytest.approx(6.0 / 2.0) and r.ratio_per_round == pytest.approx(4.0)
    assert r.conv_mean == pytest.approx(2.0) and r.misconv_std == pytest.approx(pd.Series([4.0, 10.0, 6.0]).std())
    assert (r.floor, r.target) == (6, 7.5)
    assert r.paper_ratio == pytest.approx(0.00092 / 0.00016)          # the paper's (28, 16) cell
    r1 = t[t.L == 1].iloc[0]
    assert (r1.floor, r1.target) == (3, 3.75) and math.isnan(r1.paper_ratio)   # not a paper setting
    text = timing.format_table(t)
    assert "5.75" in text and "0.92±" in text and "target" in text


def test_markdown_ratios_from_a_saved_grid(tmp_path, capsys):
    """Medians in ms and ratios by hand: fast (conv 2, MisConv 6 ms), eager (conv 1, MisConv 8 ms),
    forward + backward (conv 4, MisConv 12 ms); the paper's 28/16 ratio beside them."""
    fast = _synthetic([1e-3, 2e-3, 3e-3], [4e-3, 10e-3, 6e-3])
    eager = _synthetic([1e-3], [8e-3]).replace({"misconv": "misconv_eager"}).assign(group="eager")
    bwd = _synthetic([4e-3, 4e-3], [12e-3, 12e-3]).assign(study="backward")
    lines = timing.markdown_ratios(pd.concat([fast, eager, bwd])).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| I | C | B | conv2d+ReLU")
    assert lines[2] == "| 28 | 1 | 16 | 2.000 | 6.000 | 8.000 | **3.00** | 8.00 | 3.00 | 5.75 |"
    only_fast = timing.markdown_ratios(fast).splitlines()[2]
    assert only_fast == "| 28 | 1 | 16 | 2.000 | 6.000 | – | **3.00** | – | – | 5.75 |"


def test_summarize_per_layer():
    s = timing.summarize(_synthetic([1.0, 2.0, 3.0], [4.0, 10.0, 6.0]))
    row = s[s.layer == "misconv"].iloc[0]
    assert (row.n, row["median"], row["min"]) == (3, 6.0, 4.0)


def test_tune_malloc_and_machine_description():
    assert isinstance(timing.tune_malloc(), bool)
    m = timing.machine_description("cpu")
    assert m["device"] == "cpu" and m["cpu_cores"] >= 1 and len(m["load_average_1_5_15"]) == 3
    assert m["malloc_tuned"] == timing.malloc_tuned()


@pytest.fixture
def no_compile(monkeypatch):
    """The timing machinery does not need Inductor; the fast kernels run eagerly (seconds saved)."""
    monkeypatch.setattr(MF, "_COMPILE", False)


def test_forward_grid_measures_misconv_and_checks_layers(no_compile):
    cases = [timing.Case(size=8, batch=2, L=1, filters=4)]
    with pytest.raises(ValueError, match="layers must be a non-empty subset"):
        timing.forward_grid(cases, 1, layers=["conv", "misconvv"])
    df = timing.forward_grid(cases, 2, layers=["conv", "misconv", "misconv_eager"], eager_repeats=1, device="cpu",
                             warmup=1)
    counts = df.groupby(["group", "layer"]).size().to_dict()
    assert counts == {("fast", "conv"): 2, ("fast", "misconv"): 2, ("eager", "conv"): 1, ("eager", "misconv_eager"): 1}
    assert (df.seconds > 0).all() and set(df.clock) == {"cpu"}
    assert len(timing.ratio_table(df)) == 1 and len(timing.ratio_table(df, misconv="misconv_eager")) == 1


def test_the_shell_command_runs_the_study_and_redoes_its_tables(tmp_path, capsys, no_compile):
    from labkit.lab import study_cli

    argv = ["timing", "--results", str(tmp_path), "-p", "repeats=2", "-p", "sizes=[8]", "-p", "batch_sizes=[2]",
            "-p", "eager_repeats=0", "-p", "backward=false", "-p", "Ks=[]", "-p", "end_to_end_datasets=[]",
            "-p", "device=cpu", "--no-progress"]
    assert study_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'forward_ratios.csv'}" in out and (tmp_path / "forward.csv").is_file()
    (tmp_path / "forward_ratios.csv").unlink()
    assert study_cli.main(argv + ["--table-only"]) == 0          # from the rows on disk, measuring nothing
    assert (tmp_path / "forward_ratios.csv").is_file()


def test_run_and_write_report_follow_the_config(tmp_path, no_compile):
    """A tiny config: every grid it asks for is measured, written where results_path says, and
    reported; the end-to-end grid is skipped when no data set is named."""
    cfg = TimingConfig(sizes=[8], batch_sizes=[2], repeats=2, eager_repeats=1, threads=1, Ks=[1, 2], Ls=[1],
                       component_cell=[8, 2], end_to_end_datasets=[], device="cpu", results_dir=str(tmp_path))
    assert timing.results_path(cfg) == tmp_path
    assert timing.results_path(cfg.replace(results_dir=None)).parts[-2:] == ("timing", "quick")
    results = timing.run(cfg, progress=False)
    assert set(results) == {"machine", "forward", "backward", "components"}
    assert results["machine"].iloc[0]["torch_threads"] == 1
    fwd = pd.read_csv(tmp_path / "forward.csv")
    assert fwd.groupby(["group", "layer"]).size().to_dict() == {
        ("fast", "conv"): 2, ("fast", "misconv"): 2, ("eager", "conv"): 1, ("eager", "misconv_eager"): 1}
    assert len(pd.read_csv(tmp_path / "backward.csv").query("layer == 'misconv'")) == 1     # repeats // 2
    assert sorted(set(results["components"].K)) == [1, 2]
    written = timing.write_report(cfg, results)
    names = {p.name for p in written}
    assert {"forward_ratios.csv", "forward_ratios_eager.csv", "backward_ratios.csv", "components_ratios.csv",
            "forward_boxplots.png", "components.png", "summary.md"} <= names and "end_to_end_summary.csv" not in names
    assert (pd.read_csv(tmp_path / "components_ratios.csv").floor == [3, 6]).all()
    assert "Forward, fast path" in (tmp_path / "summary.md").read_text()
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- timing-cpu:start -->\nold\n<!-- timing-cpu:end -->\nafter\n")
    assert doc in timing.write_report(cfg, results, doc=doc)
    text = doc.read_text()
    assert "old" not in text and "| I | C | B | conv2d+ReLU" in text and text.endswith("after\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        timing.write_report(cfg, results, doc=doc, marker="timing-cuda")


@pytest.mark.slow
def test_notebook_04_smoke_run(tmp_path):
    """Papermill run of notebooks/04_timing.ipynb with a handful of measurements."""
    try:
        from labkit.lab.run_notebooks import execute
    except ImportError:  # before labkit/lab/ existed
        from labkit.run_notebooks import execute

    results = tmp_path / "timing"
    execute("04_timing", "quick", output_dir=tmp_path, results_dir=str(results), repeats=3, eager_repeats=1,
            Ks=[1, 2], Ls=[1], end_to_end_repeats=1, end_to_end_batch=4, device="cpu", timeout=600)
    fwd = pd.read_csv(results / "forward.csv")
    assert set(fwd.layer) == {"conv", "misconv", "misconv_eager"} and (fwd.seconds > 0).all()
    assert len(fwd[(fwd.layer == "misconv") & (fwd.group == "fast")]) == 3
    ratios = pd.read_csv(results / "forward_ratios.csv")
    assert len(ratios) == 1 and ratios.ratio.iloc[0] > 0 and ratios.paper_ratio.iloc[0] == pytest.approx(5.75, abs=0.01)
    comp = pd.read_csv(results / "components_ratios.csv")
    assert sorted(comp.K) == [1, 2] and (comp.floor == [3, 6]).all()
    e2e = pd.read_csv(results / "end_to_end.csv")
    assert set(e2e.layer) == {"classifier", "dmfa", "dmfa+misconv_classifier"}
    assert (results / "forward_boxplots.png").stat().st_size > 5_000
    assert "Forward, fast path" in (results / "summary.md").read_text()
