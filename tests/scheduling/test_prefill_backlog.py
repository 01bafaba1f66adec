"""prefill-backlog-scorer: the clock of prefills sent to each pod, its score, reset and config."""

from __future__ import annotations

import random

import pytest

from epp.scheduling.config import build_scheduler, load_config
from epp.scheduling.cycle import Cycle
from epp.scheduling.registry import BuildContext, ConfigError
from epp.scheduling.scorers import PrefillBacklogParams, PrefillBacklogScorer
from tests.scheduling.test_profile import HEAD, route, text
from tests.scheduling.test_scorers import CTX
from tests.scheduling.util import ep, req

P = PrefillBacklogParams(tokens_per_second=1000.0, step_seconds=0.01, scale_seconds=0.02)


def decide(s: PrefillBacklogScorer, r, eps, now: float, chosen: int, prefix: list[float] | None = None) -> list[float]:
    """Score at `now`, then route to eps[chosen] (with the prefix scorer's ratios, if given)."""
    if prefix is not None:
        r.scratch["prefix-scores:prefix-cache-scorer"] = (eps, prefix)
    scores = s.score(Cycle(r, now, 0.2), eps)
    s.on_routed(r, eps[chosen])
    return scores


def test_uncached_tokens_run_the_clock_and_lower_the_score():
    s = PrefillBacklogScorer("b", P, CTX)
    eps = [ep(1), ep(2)]
    assert decide(s, req("x" * 4000), eps, 100.0, 0) == [1.0, 1.0]  # nothing pending anywhere
    # 1,000 tokens at 1,000/s plus the 10 ms step: pod 1 busy until 101.01
    scores = s.score(Cycle(req("y"), 100.5, 0.2), eps)
    assert scores[1] == 1.0
    assert scores[0] == pytest.approx(0.02 / (0.51 + 0.02))
    assert s.score(Cycle(req("y"), 101.5, 0.2), eps) == [1.0, 1.0]  # the clock ran out


def test_cached_share_is_not_counted_and_clocks_queue_fifo():
    s = PrefillBacklogScorer("b", P, CTX)
    eps = [ep(1), ep(2)]
    decide(s, req("x" * 4000), eps, 100.0, 0, prefix=[0.75, 0.0])  # 250 uncached tokens: 0.26 s
    decide(s, req("z" * 400), eps, 100.1, 0, prefix=[0.0, 0.0])  # 100 more behind it: 0.11 s
    scores = s.score(Cycle(req("y"), 100.2, 0.2), eps)
    assert scores[0] == pytest.approx(0.02 / ((100.37 - 100.2) + 0.02))


def test_clock_restarts_when_nothing_of_ours_is_in_flight():
    s = PrefillBacklogScorer("b", P, CTX)
    a, b = ep(1), ep(2)
    r = req("x" * 40000)
    decide(s, r, [a, b], 100.0, 0)
    a.inflight = 1  # another request still there: keep the clock
    s.on_finished(r, a)
    assert s.score(Cycle(req("y"), 100.1, 0.2), [a, b])[0] < 0.01
    a.inflight = 0
    s.on_finished(r, a)
    assert s.score(Cycle(req("y"), 100.1, 0.2), [a, b]) == [1.0, 1.0]


def test_sweep_and_forget_bound_the_state():
    s = PrefillBacklogScorer("b", P, CTX)
    eps = [ep(i) for i in range(1, 6)]
    for i in range(5):
        decide(s, req("x" * 400 * (i + 1)), eps, 100.0, i)
    s.forget(eps[4].address)
    s.sweep([], 100.25)  # pods 1-2 (0.11, 0.21 s) have run out, 3-4 (0.31, 0.41 s) not
    assert sorted(s._until) == [eps[2].address, eps[3].address]


def test_not_scored_means_not_routed_here():
    """A request another profile scored (no now stamped by this plugin) leaves the clocks alone."""
    s = PrefillBacklogScorer("b", P, CTX)
    s.on_routed(req("x" * 4000), ep(1))
    assert s._until == {}


PROFILE = HEAD + """plugins:
- type: prefix-cache-scorer
- type: prefill-backlog-scorer
  parameters: {tokensPerSecond: 20000}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: prefill-backlog-scorer
    weight: 2
  - pluginRef: max-score-picker
"""


def test_through_the_profile_a_cold_prompt_avoids_the_pod_prefilling_one():
    """Two long cold prompts in a row, before any scrape could show a queue: the second goes to the
    other pod every time; without the scorer the tie is random."""
    for seed in range(10):
        sched = build_scheduler(load_config(PROFILE), rng=random.Random(seed))
        eps = [ep(1), ep(2)]
        first = route(sched, req(text(24000, seed)), eps)
        second = route(sched, req(text(24000, seed + 100)), eps)
        assert second is not first
        # a request sharing the first's prompt still follows it (prefix 3 against the backlog's 2)
        again = route(sched, req(text(24000, seed) + " more"), eps)
        assert again is first


def test_config_checks():
    with pytest.raises(ConfigError, match="tokensPerSecond"):
        load_config(PROFILE.replace("tokensPerSecond: 20000", "tokensPerSecond: 0"))
    with pytest.raises(ConfigError, match="prefixPluginName"):
        load_config(PROFILE.replace("{tokensPerSecond: 20000}", "{prefixPluginName: nope}"))
    with pytest.raises(ConfigError, match="scaleSecond"):
        load_config(PROFILE.replace("{tokensPerSecond: 20000}", "{scaleSecond: 1}"))


def test_listed_before_its_prefix_scorer_is_warned():
    wrong = PROFILE.replace("""  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: prefill-backlog-scorer
    weight: 2
""", """  - pluginRef: prefill-backlog-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
""")
    assert any("prefill-backlog-scorer" in w and "uncached" in w for w in load_config(wrong).warnings)
    assert not any("prefill-backlog-scorer" in w for w in load_config(PROFILE).warnings)


def test_own_share_adds_the_request_s_own_prefill():
    """ownShare 1: a cold pod's score carries this request's own prefill even with no clock running;
    0 (the default) scores every idle pod alike whatever it holds."""
    eps = [ep(1), ep(2)]
    r = req("x" * 4000)
    plain = PrefillBacklogScorer("b", P, CTX)
    assert decide(plain, r, eps, 100.0, 0, prefix=[1.0, 0.0]) == [1.0, 1.0]
    own = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, own_share=1.0), CTX)
    scores = decide(own, req("x" * 4000), eps, 100.0, 0, prefix=[1.0, 0.0])
    # warm pod: a step (0.01 s); cold pod: the step and 1,000 tokens (1.01 s)
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx((0.01 + 0.02) / (1.01 + 0.02))
    with pytest.raises(ConfigError, match="ownShare"):
        load_config(PROFILE.replace("tokensPerSecond: 20000", "ownShare: 2"))


def test_an_early_finish_moves_the_clock_back():
    """A request that ends before the clock had its prefill done (a fast engine, a refused prompt)
    takes its leftover off the clock, so what was queued behind it is expected sooner."""
    now = [100.0]
    ctx = BuildContext(rng=random.Random(0), detector=CTX.detector, guard=CTX.guard, clock=lambda: now[0])
    s = PrefillBacklogScorer("b", P, ctx)
    a, b = ep(1), ep(2)
    r1, r2 = req("x" * 4000), req("y" * 4000)
    decide(s, r1, [a, b], 100.0, 0)  # done at 101.01
    decide(s, r2, [a, b], 100.0, 0)  # done at 102.02
    a.inflight = 1  # r2 still there
    now[0] = 100.1
    s.on_finished(r1, a)  # 0.91 s early
    assert s._until[a.address] == pytest.approx(101.11)
    now[0] = 102.5
    s.on_finished(r2, a)  # a finish after its clock time changes nothing (another request still there)
    assert s._until[a.address] == pytest.approx(101.11)


def test_min_hit_scores_only_prompts_a_pod_holds_enough_of():
    """minHit 0.5: a prompt no pod holds half of is scored flat (its clock still runs); one a pod
    holds is scored by the clocks as without it."""
    eps = [ep(1), ep(2)]
    gated = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5), CTX)
    decide(gated, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0])  # cold: pod 1 busy to 101.01
    assert decide(gated, req("y" * 400), eps, 100.5, 1, prefix=[0.2, 0.4]) == [1.0, 1.0]
    # pod 2 now runs 60 uncached tokens and a step: busy to 100.57
    hot = decide(gated, req("z" * 400), eps, 100.5, 1, prefix=[0.9, 0.0])
    assert hot[1] == 1.0 and hot[0] == pytest.approx((0.07 + 0.02) / (0.51 + 0.02))
    r = req("w" * 400)  # no prefix scores at all (no prefix scorer ran): flat
    assert gated.score(Cycle(r, 100.5, 0.2), eps) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="minHit"):
        load_config(PROFILE.replace("tokensPerSecond: 20000", "minHit: 1.5"))


def test_cold_prompts_scores_a_prompt_no_pod_holds_any_of():
    """coldPrompts with minHit: a prompt cached nowhere is scored by the clocks (it costs its whole
    prefill wherever it goes); one a pod holds a little of (below minHit) stays flat."""
    eps = [ep(1), ep(2)]
    cold = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5, cold_prompts=True), CTX)
    decide(cold, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0])  # pod 1 busy to 101.01
    scores = decide(cold, req("y" * 400), eps, 100.5, 1, prefix=[0.0, 0.0])
    assert scores[1] == 1.0 and scores[0] == pytest.approx(0.02 / (0.51 + 0.02))
    # held a little somewhere: flat, as without coldPrompts; no prefix scorer ran at all: scored as cold
    assert decide(cold, req("z" * 400), eps, 100.5, 1, prefix=[0.2, 0.0]) == [1.0, 1.0]
    unscored = cold.score(Cycle(req("w" * 400), 100.5, 0.2), eps)
    assert unscored[1] == 1.0 and unscored[0] < 0.5  # pod 1 still has 0.51 s pending, pod 2 0.2 s
    # without it the same cold prompt is flat
    gated = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5), CTX)
    decide(gated, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0])
    assert decide(gated, req("y" * 400), eps, 100.5, 1, prefix=[0.0, 0.0]) == [1.0, 1.0]
    assert load_config(PROFILE.replace("tokensPerSecond: 20000", "coldPrompts: true")).plugins
    with pytest.raises(ConfigError, match="coldPrompts"):
        load_config(PROFILE.replace("tokensPerSecond: 20000", "coldPrompts: sometimes"))


def test_cold_prompts_count_a_scraped_queue_as_prefills_of_their_size():
    """A cold prompt's wait on a pod is its clock plus each request waiting on the pod's fresh page,
    each as long as this prompt's whole prefill: the clocks see only this picker's prefills. Warm
    prompts, stale pages and garbage counts add nothing; a huge count stays a finite wait."""
    params = PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5, cold_prompts=True)
    s = PrefillBacklogScorer("b", params, CTX)
    eps = [ep(1, waiting=3), ep(2)]
    r = req("y" * 400)  # 100 tokens at 1,000/s plus the 10 ms step: 0.11 s a waiting request
    r.scratch["prefix-scores:prefix-cache-scorer"] = (eps, [0.0, 0.0])
    scores = s.score(Cycle(r, 100.0, 0.2), eps)
    assert scores[1] == 1.0 and scores[0] == pytest.approx(0.02 / (0.33 + 0.02))
    # this picker's own backlog on pod 2 (0.51 s) outweighs the queue of 3 (0.33 s)
    decide(s, req("x" * 4000), eps, 100.0, 1, prefix=[0.0, 0.0])
    scores = decide(s, req("y" * 400), eps, 100.0, 0, prefix=[0.0, 0.0])
    assert scores[0] == 1.0 and scores[1] == pytest.approx(0.35 / (1.01 + 0.02))
    # a warm prompt is scored by the clocks alone (pod 1 now has 0.11 s of ours, pod 2 1.01 s)
    warm = decide(s, req("z" * 400), eps, 100.0, 0, prefix=[0.9, 0.9])
    assert warm[0] == 1.0 and warm[1] == pytest.approx(0.13 / 1.03)
    fresh_s = PrefillBacklogScorer("b", params, CTX)
    for page in (ep(1, waiting=3, scrape_ok=False), ep(1, metrics=False), ep(1, waiting=float("nan")),
                 ep(1, waiting=-5)):
        pair = [page, ep(2)]
        assert decide(fresh_s, req("y" * 400), pair, 100.0, 1, prefix=[0.0, 0.0])[0] == 1.0
        fresh_s.forget(pair[1].address)
    pair = [ep(1, waiting=1e300), ep(2)]
    huge = decide(fresh_s, req("y" * 400), pair, 100.0, 1, prefix=[0.0, 0.0])
    assert huge[1] == 1.0 and 0.0 < huge[0] < 1e-6
    # a burst of 120 cold prompts: the pod whose page shows 1,000 waiting gets none of them, however
    # much of ours piles up on the other (the failure that kept coldPrompts out of the default)
    burst = PrefillBacklogScorer("b", params, CTX)
    pair = [ep(1, waiting=1000), ep(2)]
    picks = []
    for i in range(120):
        r = req(str(i) * 100)
        r.scratch["prefix-scores:prefix-cache-scorer"] = (pair, [0.0, 0.0])
        sc = burst.score(Cycle(r, 100.0 + i * 0.001, 0.2), pair)
        picks.append(sc.index(max(sc)))
        burst.on_routed(r, pair[picks[-1]])
    assert picks == [1] * 120


def test_move_every_lets_one_copy_of_a_hot_prefix_through_per_period():
    """moveEverySeconds 2: the first request sent away from the pod holding its prefix is scored as
    usual; for 2 s after it, pods without the prefix score no better than the worst pod holding it,
    so a burst does not scatter the prefix; then one more move may go."""
    eps = [ep(1), ep(2), ep(3)]
    s = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5, move_every=2.0), CTX)
    decide(s, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0, 0.0])  # pod 1 busy to 101.01
    hot = [0.9, 0.0, 0.0]
    first = decide(s, req("a" * 400), eps, 100.1, 1, prefix=hot)  # free to move: pod 2 wins
    assert first[1] == first[2] == 1.0 and first[0] < 0.1
    held = s.score(Cycle(_with(req("b" * 400), eps, [0.9, 0.9, 0.0]), 100.2, 0.2), eps)
    # the copy (pod 2, busy to 100.21) scores by its clock, above pod 1; the cold pod is held to pod 1's
    assert held[0] < 0.1 < held[1] and held[2] == pytest.approx(held[0])
    held = s.score(Cycle(_with(req("c" * 400), eps, hot), 100.2, 0.2), eps)
    assert held[2] == pytest.approx(held[0]) and held[0] < 0.1  # the cold pod no better than pod 1
    # without minHit (warm: half held): no move is noted without prefix scores, and a prompt no pod
    # holds half of is never held back, even right after a move away from the pod holding most of it
    ungated = PrefillBacklogScorer("u", PrefillBacklogParams(1000.0, 0.01, 0.02, move_every=2.0), CTX)
    decide(ungated, req("x" * 4000), eps, 100.0, 0)
    assert ungated._moved == {}
    decide(ungated, req("g" * 400), eps, 100.1, 1, prefix=hot)
    assert list(ungated._moved) == [eps[0].address]
    assert ungated.score(Cycle(_with(req("e" * 400), eps, [0.3, 0.0, 0.0]), 100.2, 0.2), eps)[2] == 1.0
    later = s.score(Cycle(_with(req("d" * 400), eps, hot), 102.2, 0.2), eps)
    assert later[2] == 1.0  # the period is over
    s.sweep([], 102.2)
    assert s._moved == {}
    with pytest.raises(ConfigError, match="moveEverySeconds"):
        load_config(PROFILE.replace("tokensPerSecond: 20000", "moveEverySeconds: -1"))


def _with(r, eps, ratios):  # type: ignore[no-untyped-def]
    r.scratch["prefix-scores:prefix-cache-scorer"] = (eps, ratios)
    return r


def test_move_to_idle_only_copies_a_hot_prefix_only_to_a_pod_with_nothing_pending():
    """moveToIdleOnly: a pod without the prompt's prefix scores no better than the worst pod holding
    it while prefills of ours are pending there; an idle cold pod is scored as usual."""
    eps = [ep(1), ep(2), ep(3)]
    s = PrefillBacklogScorer("b", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5, move_to_idle=True), CTX)
    decide(s, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0, 0.0])  # pod 1 busy to 101.01
    decide(s, req("y" * 400), eps, 100.0, 1, prefix=[0.0, 0.0, 0.0])  # pod 2 busy to 100.11
    scores = s.score(Cycle(_with(req("a" * 400), eps, [0.9, 0.0, 0.0]), 100.05, 0.2), eps)
    assert scores[2] == 1.0  # idle and cold: free to take a copy
    assert scores[1] == pytest.approx(scores[0]) and scores[0] < 0.1  # busy and cold: held to pod 1's
    plain = PrefillBacklogScorer("p", PrefillBacklogParams(1000.0, 0.01, 0.02, min_hit=0.5), CTX)
    decide(plain, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0, 0.0])
    decide(plain, req("y" * 400), eps, 100.0, 1, prefix=[0.0, 0.0, 0.0])
    assert plain.score(Cycle(_with(req("a" * 400), eps, [0.9, 0.0, 0.0]), 100.05, 0.2), eps)[1] > 0.1
    text_ = PROFILE.replace("tokensPerSecond: 20000", "moveToIdleOnly: 3")
    with pytest.raises(ConfigError, match="moveToIdleOnly"):
        load_config(text_)


def test_move_to_idle_only_reads_the_clock_not_the_own_share():
    """With ownShare, an idle cold pod's wait includes this request's own prefill; it is still idle."""
    eps = [ep(1), ep(2)]
    params = PrefillBacklogParams(1000.0, 0.01, 0.02, own_share=1.0, min_hit=0.5, move_to_idle=True)
    s = PrefillBacklogScorer("b", params, CTX)
    decide(s, req("x" * 4000), eps, 100.0, 0, prefix=[0.0, 0.0])  # pod 1 busy to 101.01
    scores = s.score(Cycle(_with(req("a" * 400), eps, [0.9, 0.0]), 100.05, 0.2), eps)
    assert scores[1] == 1.0 and scores[0] < 0.2  # not held to pod 1 (0.13)


def test_peer_notes_carry_the_seconds_each_request_added():
    """--workers siblings and active-active peers: the note is the prefill seconds this request put on
    its pod's clock, and a note heard runs the hearer's clock for that pod as long (garbage ignored,
    an implausible length capped), so each worker's clock counts what all of them sent."""
    now = [100.0]
    ctx = BuildContext(rng=random.Random(0), detector=CTX.detector, guard=CTX.guard, clock=lambda: now[0])
    sender, hearer = PrefillBacklogScorer("b", P, ctx), PrefillBacklogScorer("b", P, ctx)
    eps = [ep(1), ep(2)]
    r = req("x" * 4000)
    assert sender.peer_note(r, eps[0]) is None  # not routed by this plugin: nothing to tell
    decide(sender, r, eps, 100.0, 0)
    note = sender.peer_note(r, eps[0])
    assert note == pytest.approx(1.01)  # 1,000 tokens at 1,000/s plus the 10 ms step
    hearer.peer_apply(eps[0], note)
    assert hearer.score(Cycle(req("y"), 100.5, 0.2), eps) == sender.score(Cycle(req("y"), 100.5, 0.2), eps)
    for bad in ("1.0", None, [1.0], True, -1.0, 0.0, float("nan"), float("inf")):
        hearer.peer_apply(eps[1], bad)
    assert eps[1].address not in hearer._until
    hearer.peer_apply(eps[1], 1e12)
    assert hearer._until[eps[1].address] == 100.0 + 3600.0
    # two equal notes are two prefills, not a repeat
    hearer.peer_apply(eps[0], note)
    assert hearer._until[eps[0].address] == pytest.approx(100.0 + 2 * 1.01)


def test_the_default_profile_tells_a_sibling_the_prefill_it_sent():
    """Two schedulers built from the default profile, as two --workers siblings: what one routes, the
    other's prefix index and backlog clock both learn from its notes (dispatched by plugin name)."""
    a, b = build_scheduler(load_config(None), rng=random.Random(1)), build_scheduler(load_config(None),
                                                                                   rng=random.Random(2))
    eps_a, eps_b = [ep(1), ep(2)], [ep(1), ep(2)]
    r = req(text(24000, 1))
    chosen = route(a, r, eps_a)
    notes = a.peer_notes(r, chosen)
    assert set(notes) == {"prefix-cache-scorer", "prefill-backlog-scorer"}
    assert notes["prefill-backlog-scorer"] == pytest.approx(0.006 + 6000 / 20000, rel=1e-3)  # all uncached
    twin = eps_b[eps_a.index(chosen)]
    b.apply_peer_notes(twin, notes)
    backlog = next(s.scorer for s in b.scorers if s.scorer.name == "prefill-backlog-scorer")
    assert backlog._until[twin.address] > 0
    # the sibling now sends a request of that prompt where the first went
    assert route(b, req(text(24000, 1) + " more"), eps_b) is twin


def test_the_clock_is_kept_on_the_endpoint_and_the_other_workers_clock_counts():
    """--workers: the scorer leaves its clock on the endpoint (Endpoint.prefill_until, which the
    workers' share publishes) and adds the other workers' (others_prefill_until, folded in)."""
    s = PrefillBacklogScorer("b", P, CTX)
    a, b = ep(1), ep(2)
    r = req("x" * 4000)
    decide(s, r, [a, b], 100.0, 0)
    assert a.prefill_until == pytest.approx(101.01) and b.prefill_until == 0.0
    b.others_prefill_until = 100.6  # another worker sent b a prefill that runs until 100.6
    scores = s.score(Cycle(req("y"), 100.5, 0.2), [a, b])
    assert scores == pytest.approx([(0.1 + 0.02) / (0.51 + 0.02), 1.0])
    s.on_finished(r, a)  # nothing of ours left on a: the clock goes, on the endpoint too
    assert a.prefill_until == 0.0
    fresh = PrefillBacklogScorer("b", P, CTX)  # nothing of its own pending: the others' still count
    assert fresh.score(Cycle(req("y"), 100.5, 0.2), [a, b])[1] < 1.0
