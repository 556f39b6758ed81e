"""Each placement heuristic against hand-worked examples (the arithmetic is in the comments).

Setup used by most examples: two resources (cpu, mem), every host has capacity (10, 10) and no
overcommit, so E = (10, 10) and normalising divides by 10. Hosts are made "open" (running a VM)
with a filler VM, so that the any-fit rule does not interfere, and the filler's size sets the
available vector a = (10, 10) - filler.
"""

from __future__ import annotations

import numpy as np
import pytest

from symbiont.placement import heuristics
from symbiont.placement.heuristics import HostView
from symbiont.placement.model import Host, Request
from symbiont.placement.planner import plan
from symbiont.placement.state import ClusterState


def _hosts(n: int, cap: tuple[float, float] = (10.0, 10.0)) -> list[Host]:
    return [Host(f"h{i}", {"cpu": cap[0], "mem": cap[1]}) for i in range(n)]


def _fillers(
    avail: list[tuple[float, float]], cap: tuple[float, float] = (10.0, 10.0)
) -> list[tuple[Request, str]]:
    """Existing VMs that leave exactly ``avail`` free on host i."""
    return [
        (Request(f"fill{i}", {"cpu": cap[0] - a[0], "mem": cap[1] - a[1]}), f"h{i}")
        for i, a in enumerate(avail)
    ]


def _where(avail: list[tuple[float, float]], r: tuple[float, float], heuristic: str) -> str | None:
    p = plan(
        _hosts(len(avail)),
        [Request("r", {"cpu": r[0], "mem": r[1]})],
        heuristic,
        "online",
        existing=_fillers(avail),
    )
    return p.placements.get("r")


# Example A: r = (1, 3), available a: h0 = (2, 4), h1 = (3, 9), h2 = (9.5, 3).  All feasible.
#   r^ = (0.1, 0.3), |r^| = 0.31623
#   best/worst fit, sum_i (a_i - r_i)/10: h0 (1+1)/10 = 0.2   h1 (2+6)/10 = 0.8   h2 (8.5+0)/10 = 0.85
#   cosine: h0 a^=(.2,.4):  (.02+.12)/(.31623*.44721) = 0.9899
#           h1 a^=(.3,.9):  parallel to r^                 = 1.0
#           h2 a^=(.95,.3): (.095+.09)/(.31623*.99624)     = 0.5872
#   l2-norm-diff: h0 (.1-.2)^2+(.3-.4)^2 = 0.02   h1 .04+.36 = 0.40   h2 .7225+0 = 0.7225
#   l2-norm-ratio: h0 1/2+3/4 = 1.25   h1 1/3+3/9 = 0.667   h2 1/9.5+3/3 = 1.105
EXAMPLE_A = ([(2, 4), (3, 9), (9.5, 3)], (1, 3))


@pytest.mark.parametrize(
    "heuristic, expected",
    [
        ("first-fit", "h0"),  # lowest index
        ("best-fit", "h0"),  # min leftover 0.2
        ("worst-fit", "h2"),  # max leftover 0.85
        ("cosine", "h1"),  # cos = 1.0
        ("l2-norm-diff", "h0"),  # 0.02
        ("l2-norm-ratio", "h0"),  # 1.25
        ("ffd-prod", "h0"),  # online = first fit
        ("ffd-sum", "h0"),
    ],
)
def test_example_a(heuristic: str, expected: str) -> None:
    assert _where(*EXAMPLE_A, heuristic) == expected


# Example B: r = (1, 1), a: h0 = (1.25, 10), h1 = (4, 4).
#   best fit: h0 (.25+9)/10 = 0.925, h1 (3+3)/10 = 0.6             -> h1
#   l2-norm-ratio: h0 1/1.25 + 1/10 = 0.9, h1 1/4 + 1/4 = 0.5       -> h0 (fills h0's scarce cpu)
#   l2-norm-diff: h0 (.1-.125)^2 + (.1-1)^2 = 0.8106, h1 2*(.1-.4)^2 = 0.18 -> h1
#   cosine: h0 (.0125+.1)/(.14142*1.00778) = 0.789, h1 = 1.0        -> h1
@pytest.mark.parametrize(
    "heuristic, expected",
    [
        ("best-fit", "h1"),
        ("l2-norm-ratio", "h0"),
        ("l2-norm-diff", "h1"),
        ("cosine", "h1"),
        ("worst-fit", "h0"),
    ],
)
def test_example_b(heuristic: str, expected: str) -> None:
    assert _where([(1.25, 10), (4, 4)], (1, 1), heuristic) == expected


# Example C: r = (2, 2), a: h0 = (2, 6.5), h1 = (4.5, 4.5).
#   best fit (L1 leftover): h0 (0+4.5)/10 = 0.45, h1 (2.5+2.5)/10 = 0.5      -> h0
#   l2-norm-diff: h0 (.2-.2)^2 + (.2-.65)^2 = 0.2025, h1 2*(.2-.45)^2 = 0.125 -> h1
def test_example_c_best_fit_and_l2_diff_disagree() -> None:
    assert _where([(2, 6.5), (4.5, 4.5)], (2, 2), "best-fit") == "h0"
    assert _where([(2, 6.5), (4.5, 4.5)], (2, 2), "l2-norm-diff") == "h1"


def test_scores_match_hand_arithmetic() -> None:
    # Example A's numbers, straight from the score functions.
    avail = np.array([[2, 4], [3, 9], [9.5, 3]], dtype=float)
    view = HostView(avail, np.full((3, 2), 10.0))
    r = np.array([1.0, 3.0])
    h = heuristics.HEURISTICS
    np.testing.assert_allclose(h["best-fit"].score(r, view), [0.2, 0.8, 0.85], atol=1e-12)
    np.testing.assert_allclose(h["cosine"].score(r, view), [0.98995, 1.0, 0.58722], atol=1e-5)
    np.testing.assert_allclose(h["l2-norm-diff"].score(r, view), [0.02, 0.40, 0.7225], atol=1e-12)
    np.testing.assert_allclose(h["l2-norm-ratio"].score(r, view), [1.25, 2 / 3, 1 / 9.5 + 1], atol=1e-12)


def test_infeasible_host_is_never_chosen_even_with_the_best_score() -> None:
    # r = (3, 1): h0 a=(2.9, 10) would be the cosine/l2 favourite but lacks cpu; h1 a=(10, 10) fits.
    for name in heuristics.HEURISTICS:
        assert _where([(2.9, 10), (10, 10)], (3, 1), name) == "h1", name


def test_ties_go_to_the_lowest_index() -> None:
    # Three identical open hosts: every score ties, every heuristic picks h0.
    for name in heuristics.HEURISTICS:
        assert _where([(5, 5), (5, 5), (5, 5)], (1, 1), name) == "h0", name


def test_any_fit_rule_prefers_open_hosts() -> None:
    # h0 is open with a = (3, 3); h1 is empty. r = (1, 1). Cosine of r with h1's (10, 10) is 1.0 and
    # with h0's (3, 3) also 1.0; worst fit would love the empty host (leftover 1.8 vs 0.4).
    # Any-fit: an open host that fits wins, for every heuristic.
    hosts = _hosts(2)
    existing = [(Request("f", {"cpu": 7, "mem": 7}), "h0")]
    for name in heuristics.HEURISTICS:
        p = plan(hosts, [Request("r", {"cpu": 1, "mem": 1})], name, "online", existing=existing)
        assert p.placements["r"] == "h0", name
    # Without the rule, worst fit spreads onto the empty host (load balancing).
    p = plan(
        hosts,
        [Request("r", {"cpu": 1, "mem": 1})],
        "worst-fit",
        "online",
        existing=existing,
        prefer_open=False,
    )
    assert p.placements["r"] == "h1"


# 1-D first fit vs first-fit decreasing, capacity 10, items in this order: 5 7 5 2 4 2 5 1 6 (sum 37).
#   FF:  5->h0  7->h1  5->h0(10)  2->h1(9)  4->h2  2->h2(6)  5->h3  1->h1(10)  6->h4        = 5 hosts
#   FFD: sorted 7 6 5 5 5 4 2 2 1:
#        7->h0  6->h1  5->h2  5->h2(10)  5->h3  4->h1(10)  2->h0(9)  2->h3(7)  1->h0(10)  = 4 hosts
ITEMS = [5, 7, 5, 2, 4, 2, 5, 1, 6]


def test_first_fit_online_vs_first_fit_decreasing() -> None:
    hosts = [Host(f"h{i}", {"mem": 10}) for i in range(9)]
    reqs = [Request(f"v{i}", {"mem": s}) for i, s in enumerate(ITEMS)]
    ff = plan(hosts, reqs, "first-fit", "online")
    assert ff.hosts_used == 5
    assert [ff.placements[f"v{i}"] for i in range(9)] == [
        "h0",
        "h1",
        "h0",
        "h1",
        "h2",
        "h2",
        "h3",
        "h1",
        "h4",
    ]
    ffd = plan(hosts, reqs, "ffd-sum", "batch")
    assert ffd.hosts_used == 4
    # decision order is the sorted order; stable among the three 5s (v0, v2, v6)
    assert [d.request_id for d in ffd.decisions] == ["v1", "v8", "v0", "v2", "v6", "v4", "v3", "v5", "v7"]
    assert [ffd.placements[f"v{i}"] for i in (1, 8, 0, 2, 6, 4, 3, 5, 7)] == [
        "h0",
        "h1",
        "h2",
        "h2",
        "h3",
        "h1",
        "h0",
        "h3",
        "h0",
    ]


def test_ffd_prod_and_ffd_sum_sort_differently() -> None:
    # E = (10, 10). a = (8, 1): sum .9, prod .08.   b = (4, 4): sum .8, prod .16.
    # c = (1, 1): sum .2, prod .01.                  d = (5, 0): sum .5, prod 0.
    # ffd-sum order: a b d c.   ffd-prod order: b a c d.
    reqs = [
        Request("a", {"cpu": 8, "mem": 1}),
        Request("b", {"cpu": 4, "mem": 4}),
        Request("c", {"cpu": 1, "mem": 1}),
        Request("d", {"cpu": 5, "mem": 0}),
    ]
    hosts = _hosts(4)
    assert [d.request_id for d in plan(hosts, reqs, "ffd-sum", "batch").decisions] == ["a", "b", "d", "c"]
    assert [d.request_id for d in plan(hosts, reqs, "ffd-prod", "batch").decisions] == ["b", "a", "c", "d"]
    # online keeps input order
    assert [d.request_id for d in plan(hosts, reqs, "ffd-prod", "online").decisions] == ["a", "b", "c", "d"]


def test_overcommit_scales_capacity() -> None:
    # 4 physical cores at 2:1 hold 8 one-core VMs; the 9th is rejected, naming the ratio.
    hosts = [Host("h0", {"cpu": 4, "mem": 100}, {"cpu": 2.0})]
    reqs = [Request(f"v{i}", {"cpu": 1, "mem": 1}) for i in range(9)]
    p = plan(hosts, reqs, "best-fit", "online")
    assert len(p.placements) == 8
    assert p.rejected[0].request_id == "v8"
    assert p.rejected[0].reason == "cpu: needs 1, largest free 0 after overcommit 2"
    # utilisation is reported against physical capacity: 8 cores allocated on 4 = 200%
    assert p.utilisation_after["h0"]["cpu"] == pytest.approx(2.0)


def test_heterogeneous_hosts_normalise_per_host() -> None:
    # h0 E=(100, 10) with a = (50, 5); h1 E=(10, 100) with a = (5, 50) (both half full).
    # r = (1, 4): cosine on h0: r^=(.01,.4), a^=(.5,.5) -> (.005+.2)/(.40012*.70711) = 0.7245
    #             cosine on h1: r^=(.1,.04), a^=(.5,.5) -> (.05+.02)/(.10770*.70711)  = 0.9191 -> h1
    hosts = [Host("h0", {"cpu": 100, "mem": 10}), Host("h1", {"cpu": 10, "mem": 100})]
    existing = [(Request("f0", {"cpu": 50, "mem": 5}), "h0"), (Request("f1", {"cpu": 5, "mem": 50}), "h1")]
    p = plan(hosts, [Request("r", {"cpu": 1, "mem": 4})], "cosine", "online", existing=existing)
    assert p.placements["r"] == "h1"
    assert p.decisions[0].score == pytest.approx(0.9191, abs=1e-4)


def test_incremental_view_matches_recomputation() -> None:
    st = ClusterState(_hosts(3, (16.0, 64.0)))
    rng = np.random.default_rng(3)
    for i in range(30):
        st.add(Request(f"v{i}", {"cpu": float(rng.integers(0, 3)), "mem": float(rng.integers(0, 8))}), i % 3)
    for i in range(0, 30, 4):
        st.remove(f"v{i}")
    st.move("v1", 2)
    fresh = HostView(st.effective - st.used, st.effective)
    for name in ("avail", "a_inv2", "an_sum", "an_sq"):
        np.testing.assert_allclose(getattr(st, name), getattr(fresh, name), atol=1e-12, err_msg=name)
    copy = st.copy()
    copy.add(Request("new", {"cpu": 1, "mem": 1}), 0)
    assert "new" not in st.vms and st.avail[0, 0] == pytest.approx(copy.avail[0, 0] + 1)


def test_every_heuristic_has_a_formula_and_is_listed() -> None:
    assert set(heuristics.HEURISTICS) == {
        "first-fit",
        "best-fit",
        "worst-fit",
        "cosine",
        "l2-norm-diff",
        "l2-norm-ratio",
        "ffd-prod",
        "ffd-sum",
    }
    for h in heuristics.HEURISTICS.values():
        assert h.formula and h.doc
    with pytest.raises(ValueError, match="unknown heuristic 'best'.*best-fit"):
        heuristics.get("best")


def test_ties_go_to_the_lowest_host_index_despite_float_noise() -> None:
    from symbiont.placement.model import Host, Request
    from symbiont.placement.planner import plan

    # h0 holds 0.2 + 0.1 and h1 holds 0.3: the same free 0.7, but 1 - 0.2 - 0.1 and 1 - 0.3 differ in
    # the last bit, and best fit, l2-norm-diff and l2-norm-ratio picked h1.
    hosts = [Host("h0", {"cpu": 1.0}), Host("h1", {"cpu": 1.0})]
    ex = [
        (Request("x", {"cpu": 0.2}), "h0"),
        (Request("y", {"cpu": 0.1}), "h0"),
        (Request("z", {"cpu": 0.3}), "h1"),
    ]
    for name in heuristics.HEURISTICS:
        p = plan(hosts, [Request("n", {"cpu": 0.01})], name, "online", ex)
        assert p.placements == {"n": "h0"}, name
    # worst fit: 0.3 + 0.15 against 0.45
    ex = [
        (Request("x", {"cpu": 0.3}), "h0"),
        (Request("y", {"cpu": 0.15}), "h0"),
        (Request("z", {"cpu": 0.45}), "h1"),
    ]
    assert plan(hosts, [Request("n", {"cpu": 0.01})], "worst-fit", "online", ex).placements == {"n": "h0"}


def test_capacity_tolerance_is_relative() -> None:
    from symbiont.placement.model import Host, Request
    from symbiont.placement.planner import plan

    # Tiny units: a VM five times its host was placed under the fixed 1e-9 slack.
    p = plan([Host("h0", {"mem": 1e-10})], [Request("v", {"mem": 5e-10})], "first-fit")
    assert p.rejected and p.rejected[0].reason.startswith("mem: needs 5e-10, largest free 1e-10")
    # Huge units: sums that should be exact still fit (0.1 + 0.2 of 3e12 onto 0.3 of it).
    c = 3e12
    p = plan(
        [Host("h0", {"mem": 0.3 * c})],
        [Request("a", {"mem": 0.1 * c}), Request("b", {"mem": 0.2 * c})],
        "first-fit",
    )
    assert not p.rejected
