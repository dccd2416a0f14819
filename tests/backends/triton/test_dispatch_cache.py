"""backends/triton/dispatch_cache.py: the auto dispatch's timed path choices survive the process."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
from qcompile.backends.triton import dispatch_cache, path_clock, w4_linear

KEY = (True, 1, 4096, 4096, "dint4", 0, 8, False, 0, torch.float16, False, torch.device("cpu"))


@pytest.fixture
def timing(tmp_path, monkeypatch):
    """A fresh cache home and process state; ``timing["times"]`` are the fake GPU times of the paths,
    ``timing["calls"]`` counts the candidate runs."""
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(w4_linear, "interpreting", lambda: False)
    monkeypatch.setattr(w4_linear, "_PATH_CACHE", {})
    monkeypatch.setattr(w4_linear, "_SOLE_PATH", {})
    monkeypatch.setattr(dispatch_cache, "_memory", {})
    state = {"times": {"fused": 3.0, "gemv": 2.0}, "calls": 0}

    def fake_time(fn, device):
        return state["times"][fn()]

    monkeypatch.setattr(path_clock, "streaming_time", fake_time)
    return state


def _candidates(state):
    def run(name):
        state["calls"] += 1
        return name
    return {"fused": lambda: run("fused"), "gemv": lambda: run("gemv")}


def _new_process(monkeypatch):
    monkeypatch.setattr(w4_linear, "_PATH_CACHE", {})
    monkeypatch.setattr(w4_linear, "_SOLE_PATH", {})
    monkeypatch.setattr(dispatch_cache, "_memory", {})


def test_a_later_process_takes_the_stored_winner(timing, tmp_path, monkeypatch):
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"
    assert timing["calls"] == 4  # each path run once to compile, once timed
    stored = json.loads((tmp_path / "home" / "triton" / "dispatch_paths.json").read_text())
    (env, entries), = stored.items()
    assert "kernels " in env and entries == {repr((*KEY[:-1], w4_linear._kernel_switches(), KEY[-1])): "gemv"}
    _new_process(monkeypatch)
    timing["times"] = {"fused": 1.0, "gemv": 2.0}  # would now pick fused if it timed again
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"
    assert timing["calls"] == 4  # nothing run, nothing compiled
    assert w4_linear._choose_path(KEY, _candidates(timing), "fused") == "fused"  # forcing still wins


def test_another_environment_or_missing_path_times_again(timing, monkeypatch):
    w4_linear._choose_path(KEY, _candidates(timing), "auto")
    _new_process(monkeypatch)
    monkeypatch.setattr(dispatch_cache, "_source_digest", lambda: "edited kernels")
    timing["times"] = {"fused": 1.0, "gemv": 2.0}
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "fused"
    _new_process(monkeypatch)
    cands = _candidates(timing)
    del cands["fused"]  # a stored path this build no longer offers is ignored
    cands["splitk"] = lambda: "gemv"
    timing["calls"] = 0
    assert w4_linear._choose_path(KEY, cands, "auto") in cands and timing["calls"] == 2


def test_switch_off_and_unwritable_home(timing, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_AUTOTUNE_CACHE", "0")
    w4_linear._choose_path(KEY, _candidates(timing), "auto")
    assert not (tmp_path / "home").exists()
    monkeypatch.delenv("QCOMPILE_AUTOTUNE_CACHE")
    _new_process(monkeypatch)
    (tmp_path / "home").write_text("a file where the folder should be")
    monkeypatch.setattr(dispatch_cache, "_warned", False)
    with pytest.warns(RuntimeWarning, match="cannot keep the timed dispatch paths"):
        assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"
    assert not list(tmp_path.glob("**/*.tmp"))


def test_a_kernel_switch_times_the_choice_again(timing, monkeypatch):
    """A choice timed under one setting of the kernel switches (``DISPATCH.gemv_direct_rows`` here) is not
    reused under another, in this process or a later one; back under the first, it is."""
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"
    monkeypatch.setattr(w4_linear.DISPATCH, "gemv_direct_rows", True)
    timing["times"] = {"fused": 1.0, "gemv": 2.0}  # as if the switch had made fused the faster path
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "fused"
    assert timing["calls"] == 8
    _new_process(monkeypatch)
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "fused"
    monkeypatch.setattr(w4_linear.DISPATCH, "gemv_direct_rows", False)
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"
    assert timing["calls"] == 8  # both stored: nothing timed again


def test_a_capture_takes_the_stored_choice_and_times_nothing(timing, monkeypatch):
    """Inside a CUDA graph capture nothing can be timed: a choice stored earlier (this process or on disk) is
    taken, else the first candidate, and no candidate runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "fused"  # the first; "gemv" is faster
    assert timing["calls"] == 0 and not w4_linear._PATH_CACHE
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"  # timed and stored
    _new_process(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls = timing["calls"]
    assert w4_linear._choose_path(KEY, _candidates(timing), "auto") == "gemv"  # from disk, under capture
    assert timing["calls"] == calls


@pytest.mark.parametrize("m,first", [(1, "gemv"), (4, "gemv"), (5, "unfused"), (16, "unfused")])
def test_the_untimed_fallback_is_the_gemv_at_small_m(m, first, monkeypatch):
    """The decode candidates of one weight and of sibling weights start with the path taken where nothing
    can be timed: the GEMV at M <= 4, the tiled GEMM above; the fused GEMM (never the fastest) comes last."""
    from triton_cases import make_weight, make_x

    class Chosen(Exception):
        pass

    seen = []

    def record(key, candidates, forced):
        seen.append(list(candidates))
        raise Chosen

    monkeypatch.setattr(w4_linear, "_choose_path", record)
    pw = make_weight(24, 256, "dint4", "channel", "cpu")
    x = make_x(m, 256, "cpu")
    with pytest.raises(Chosen):
        w4_linear.w4_linear_2d(x, pw, 8, False, 0, None)
    with pytest.raises(Chosen):
        w4_linear._shared_per_weight((x.to(torch.int8), None, None), [pw], [torch.empty(m, 24)], [None], 8, False)
    (single, per_weight) = seen
    assert single[0] == first and single[-1] == "fused"
    assert per_weight[0] == first


def _listed_candidates(monkeypatch) -> list:
    """Make the dispatch record each call's candidate names (and take the first) instead of timing them, with every
    launch stubbed out: the candidates are only listed. Returns the list the names go to."""
    seen = []

    def record(key, candidates, forced):
        seen.append(list(candidates))
        return next(iter(candidates))

    monkeypatch.setattr(w4_linear, "_choose_path", record)
    for launch in ("_quantized_ksplit", "_quantized_gemv", "_quantized_gemm", "launch_gemv", "launch_gemm",
                   "launch_ksplit"):
        monkeypatch.setattr(w4_linear, launch, lambda *a, **k: None)
    return seen


def _linear_sites(ms, grouped_m: int) -> None:
    """For each M of ``ms``: one per-channel dINT4 weight through ``w4_linear_2d`` and through the shared-codes path
    (``_shared_per_weight``); then one group-wise weight at ``grouped_m`` rows."""
    from triton_cases import make_weight, make_x

    pw = make_weight(24, 256, "dint4", "channel", "cpu")
    for m in ms:
        x = make_x(m, 256, "cpu")
        w4_linear.w4_linear_2d(x, pw, 8, False, 0, None)
        w4_linear._shared_per_weight((x.to(torch.int8), None, None), [pw], [torch.empty(m, 24)], [None], 8, False)
    w4_linear.w4_linear_2d(make_x(grouped_m, 256, "cpu"), make_weight(24, 256, "int4", "group64", "cpu"), 8, False, 0,
                           None)


@pytest.mark.parametrize("on", [True, False])
def test_ksplit_is_a_decode_candidate_behind_its_switch(on, monkeypatch):
    """The k-split decode GEMM is a candidate of one per-channel weight and of sibling weights at M <= 16 while
    ``DISPATCH.ksplit_candidate`` is on, never for grouped weights, and at prefill (M = 17) only behind its own
    switch (``ksplit_wide_candidate``, off here; ``test_ksplit_wide_rows_follow_their_own_switch``)."""
    seen = _listed_candidates(monkeypatch)
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_candidate", on)
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_wide_candidate", False)
    _linear_sites((1, 16, 17), grouped_m=4)
    assert [("ksplit" in c) for c in seen] == [on, on, on, on, False, False, False]


@pytest.mark.parametrize("on", [True, False])
def test_ksplit_wide_rows_follow_their_own_switch(on, monkeypatch):
    """From M = 17 to 64 the k-split GEMM (32- and 64-row tiles) is a prefill candidate of one per-channel weight
    and of sibling weights on shared codes while ``DISPATCH.ksplit_wide_candidate`` is on, whatever
    ``ksplit_candidate`` says; never above 64 rows or for grouped weights; the tiled GEMM stays the first (the
    untimed fallback)."""
    seen = _listed_candidates(monkeypatch)
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_wide_candidate", on)
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_candidate", not on)
    _linear_sites((17, 64, 65), grouped_m=40)
    assert [("ksplit" in c) for c in seen] == [on, on, on, on, False, False, False]
    assert all(c[0] == "inloop" for c in seen)


@pytest.mark.parametrize("on", [True, False])
def test_ksplit_pdl_follows_its_own_switch(on, monkeypatch):
    """The k-split candidate's quantization and GEMM are programmatic dependents exactly while
    ``DISPATCH.ksplit_pdl`` is on (and, on sibling weights' shared codes, while the caller launched them so),
    whatever ``gemm_pdl`` says."""
    from triton_cases import make_weight, make_x

    flags = []
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_pdl", on)
    monkeypatch.setattr(w4_linear.DISPATCH, "gemm_pdl", not on)
    monkeypatch.setattr(w4_linear, "quantize_rows", lambda x, *a, pdl=False: (flags.append(("quant", pdl)), x)[1:] * 3)
    monkeypatch.setattr(w4_linear, "launch_ksplit", lambda *a, pdl=False, **k: flags.append(("ksplit", pdl)))
    pw = make_weight(24, 256, "dint4", "channel", "cpu")
    x = make_x(2, 256, "cpu")
    w4_linear._quantized_ksplit(x, pw, torch.empty(2, 24), 8, False, None)
    assert flags == [("quant", on), ("ksplit", on)]

    def ksplit_only(key, candidates, forced):
        candidates["ksplit"]()
        return "ksplit"

    monkeypatch.setattr(w4_linear, "_choose_path", ksplit_only)
    for caller_pdl in (True, False):
        flags.clear()
        w4_linear._shared_per_weight((x.to(torch.int8), None, None), [pw], [torch.empty(2, 24)], [None], 8, False,
                                     pdl=caller_pdl)
        assert flags[-1] == ("ksplit", on and caller_pdl)


@pytest.mark.parametrize("pdl_default", [True, False])
def test_the_ksplit_dependent_launch_is_a_decode_path_of_its_own(pdl_default, monkeypatch):
    """With ``DISPATCH.ksplit_pdl`` off, "ksplit_pdl" is one more decode candidate (timed against the rest like
    every path): the quantization and the k-split GEMM both as programmatic dependents; with it on, "ksplit" is
    already that launch and there is no second one. Off with ``ksplit_pdl_candidate``."""
    from triton_cases import make_weight, make_x

    flags, seen = [], []
    monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_pdl", pdl_default)
    monkeypatch.setattr(w4_linear, "quantize_rows", lambda x, *a, pdl=False: (flags.append(("quant", pdl)), x)[1:] * 3)
    monkeypatch.setattr(w4_linear, "launch_ksplit", lambda *a, pdl=False, **k: flags.append(("ksplit", pdl)))

    def record(key, candidates, forced):
        seen.append(list(candidates))
        if "ksplit_pdl" in candidates:
            candidates["ksplit_pdl"]()
        return "ksplit"

    monkeypatch.setattr(w4_linear, "_choose_path", record)
    pw = make_weight(24, 256, "dint4", "channel", "cpu")
    for candidate in (True, False):
        monkeypatch.setattr(w4_linear.DISPATCH, "ksplit_pdl_candidate", candidate)
        flags.clear()
        seen.clear()
        w4_linear.w4_linear_2d(make_x(4, 256, "cpu"), pw, 8, False, 0, None)
        offered = candidate and not pdl_default
        assert ("ksplit_pdl" in seen[0]) == offered and "ksplit" in seen[0]
        assert flags == ([("quant", True), ("ksplit", True)] if offered else []) + [("quant", pdl_default),
                                                                                      ("ksplit", pdl_default)]


def test_dispatch_choices_names_every_site_of_a_bucket(monkeypatch):
    """``dispatch_choices`` lists the single, shared and group choices of one M bucket made under the current
    switches, and none of another bucket or of other switches."""
    monkeypatch.setattr(w4_linear, "_PATH_CACHE", {})
    monkeypatch.setattr(w4_linear, "_SOLE_PATH", {})
    sw, dev = w4_linear._kernel_switches(), "cuda:0"
    cache = w4_linear._PATH_CACHE
    cache[(True, 16, 4096, 11008, "dint4", 0, 8, False, 0, torch.half, False, sw, dev)] = "ksplit"
    cache[(True, 1, 4096, 11008, "dint4", 0, 8, False, 0, torch.half, False, sw, dev)] = "gemv"
    cache[("shared", True, 16, 11008, 4096, "dint4", 8, False, torch.half, False, sw, dev)] = "unfused"
    cache[("group", 16, (4096, 4096, 4096), 4096, "dint4", 8, False, torch.half, False, sw, dev)] = "per_weight"
    cache[("group_codes", 16, (11008, 11008), 4096, "dint4", 8, False, torch.half, False, sw, dev)] = "gemv_group"
    cache[(True, 16, 4096, 4096, "dint4", 0, 8, False, 0, torch.half, False, ("other switches",), dev)] = "splitk"
    assert w4_linear.dispatch_choices(9) == {"linear 4096x11008": "ksplit", "shared 11008x4096": "unfused",
                                             "group 4096+4096+4096x4096": "per_weight",
                                             "group_codes 11008+11008x4096": "gemv_group"}
    assert w4_linear.dispatch_choices(1) == {"linear 4096x11008": "gemv"}


def test_chosen_path_reads_the_choice_of_its_shape(timing):
    assert w4_linear.chosen_path(1, 4096, 4096) is None  # nothing chosen yet
    w4_linear._choose_path(KEY, _candidates(timing), "auto")
    assert w4_linear.chosen_path(1, 4096, 4096) == "gemv"
    assert w4_linear.chosen_path(1, 4096, 11008) is None  # another shape
    assert w4_linear.chosen_path(2, 4096, 4096) is None  # another M bucket
    assert w4_linear.chosen_path(1, 4096, 4096, act_bits=4) is None


def test_chosen_path_reads_single_weight_choices_only(timing):
    """A shared-weights key (``("shared", decode?, bucket, N, K, fmt, act_bits, ...)``) whose fields line up with a
    single weight's positions is not read as one (``True == 1`` once made its decode flag pass as bucket 1)."""
    shared = ("shared", True, 16, 4096, 4096, "dint4", 8, False, torch.float16, False, False, torch.device("cpu"))
    w4_linear._choose_path(shared, _candidates(timing), "auto")  # bucket 16, N = K = 4096
    assert w4_linear._PATH_CACHE and w4_linear.chosen_path(1, 16, 4096) is None


def test_an_only_candidate_is_named_but_never_taken_as_a_choice(timing, tmp_path):
    """A call with one candidate runs it untimed. ``chosen_path`` names it (the kernel benchmark printed "?" for
    the tiled GEMM at M = 64), nothing is stored, and the same key offering two candidates later is timed."""
    cands = _candidates(timing)
    assert w4_linear._choose_path(KEY, {"fused": cands["fused"]}, "auto") == "fused"
    assert timing["calls"] == 0 and w4_linear.chosen_path(1, 4096, 4096) == "fused"
    assert not w4_linear._PATH_CACHE and not (tmp_path / "home" / "triton" / "dispatch_paths.json").exists()
    assert w4_linear._choose_path(KEY, cands, "auto") == "gemv"
    assert timing["calls"] == 4 and w4_linear.chosen_path(1, 4096, 4096) == "gemv"


def test_a_bucket_straddling_expand_min_m_keeps_its_choices_apart(timing, monkeypatch):
    """M = 129-256 share an M bucket, but "expand" is a prefill candidate from ``expand_min_m`` = 256 on. A choice
    of "expand" timed at M = 256 must not be taken at M = 200, where it is not offered (before ``_choose_path``
    checked that: a KeyError)."""
    from types import SimpleNamespace

    ran = []

    def fake_gemm(x, pw, y, act_bits, act_sym, act_group, bias, expand, split_k):
        ran.append((x.shape[0], expand))
        return "expand" if expand else "inloop"

    monkeypatch.setattr(w4_linear, "_quantized_gemm", fake_gemm)
    monkeypatch.setattr(w4_linear.DISPATCH, "expand_min_m", 256)
    timing["times"] = {"expand": 1.0, "inloop": 2.0}
    pw = SimpleNamespace(out_features=64, in_features=128, fmt="dint4", group_size=0)
    w4_linear.w4_linear_2d(torch.zeros(256, 128, dtype=torch.float16), pw, 8, False, 0, None)
    assert ran[-1] == (256, True)  # timed, and expand won
    w4_linear.w4_linear_2d(torch.zeros(200, 128, dtype=torch.float16), pw, 8, False, 0, None)
    assert ran[-1] == (200, False)  # the only candidate there
    assert w4_linear.dispatch_choices(256) == {"linear 64x128": "expand"}  # the timed choice over the sole path
