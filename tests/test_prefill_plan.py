"""A prompt's chunks sized by its route (swarm/prefill_plan.py): predicted from the route's stages,
then fitted to what the client measured on it. Live: tests/test_swarm.py (a slow route's prompt in
more chunks, exact, and what its steps took learned)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from molink.peer.cost_curve import BLOCKS_CURVE, Line, PrefillCost
from molink.swarm.pipeline_cost import HEAD_CURVE, LINEAR, STEP_OVERHEAD, PipelineCosts, Stage
from molink.swarm.prefill_plan import PrefillPlanner, even_chunks, fixed_chunks


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int


ROUTE = [Hop("a", 0, 2), Hop("b", 2, 4), Hop("c", 4, 6)]


def wan_route(rate: float = 12.5e6, hop_seconds: float = 0.0006, row_bytes: int = 256, delay: float = 0.02,
              fixed: float = STEP_OVERHEAD) -> PipelineCosts:
    """Client + 3 peers on machines of their own, links of `rate` bytes/s and `delay` one way."""
    stages = [Stage("head", 0.0002, HEAD_CURVE, "client", fixed, prefill="once")]
    stages += [Stage(f"hop {i}", hop_seconds, BLOCKS_CURVE, f"10.0.0.{i}", fixed) for i in range(3)]
    stages += [Stage(f"link {i}", row_bytes / rate, LINEAR, None, prefill="last" if i == 3 else "rows", link=True)
               for i in range(4)]
    return PipelineCosts(stages, [delay] * 4, {"client": 2})


def planner_for(**route) -> PrefillPlanner:
    """A planner for the route wan_route(**route), whose links and peers it may find faster or slower."""
    rate, hop_seconds = route.pop("rate", 12.5e6), route.pop("hop_seconds", 0.0006)
    keep = route.pop("keep_route_blind", 0.0)  # the predictions alone, unless a test asks for the prior
    return PrefillPlanner(lambda _, link_speed=1.0, compute_speed=1.0: wan_route(
        rate=rate * link_speed, hop_seconds=hop_seconds / compute_speed, **route), keep_route_blind=keep)


def test_chunks_are_near_equal_and_short_prompts_go_whole():
    assert even_chunks(300, 4) == [75] * 4 and even_chunks(10, 3) == [4, 3, 3]
    assert fixed_chunks(100) == [100] and fixed_chunks(300) == [75] * 4 and len(fixed_chunks(4096)) == 8
    assert planner_for(rate=1e4).chunks(ROUTE, 31) == [31]  # two chunks would be under 16 tokens


def test_slower_links_cut_a_prompt_into_more_chunks():
    """At 100 Mbit/s the tiny model's prompt of 128 tokens goes as 2 chunks (what the WAN bed runs
    best with); at 10 Mbit/s its bytes dominate and many small chunks hide them."""
    fast, slow = planner_for(), planner_for(rate=1.25e6)
    for tokens in (128, 300, 1024):
        assert len(slow.chunks(ROUTE, tokens)) > len(fast.chunks(ROUTE, tokens)) > 1
    assert len(fast.chunks(ROUTE, 128)) == 2


def test_the_route_blind_rule_stays_unless_another_count_is_predicted_clearly_faster():
    """The default planner keeps the rule's count (tuned on the WAN bed) where its predictions gain
    less than they err (the bed's route: 100 Mbit/s, the tiny model), and leaves it where they gain
    a lot: links of 100 kB/s (more chunks hide their bytes), fixed costs that dwarf the work (fewer)."""
    for tokens in (128, 300, 1024):
        assert planner_for(keep_route_blind=0.10).chunks(ROUTE, tokens) == fixed_chunks(tokens)
    assert len(planner_for().chunks(ROUTE, 1024)) != 8  # the predictions alone would have left it
    assert len(planner_for(keep_route_blind=0.10, rate=1e5).chunks(ROUTE, 300)) >= 8
    assert planner_for(keep_route_blind=0.10, fixed=0.05).chunks(ROUTE, 300) == [300]


def test_a_route_measured_slower_than_assumed_leaves_the_rule_for_the_count_it_needs():
    """Assumed 100 Mbit/s, the links carry 100 kB/s: the rule's 4 chunks go first, their answers'
    spacing shows the links' speed, and the next prompt goes in the many chunks such links need."""
    planner, slow = planner_for(keep_route_blind=0.10), wan_route(rate=1e5)
    assert planner.chunks(ROUTE, 300) == fixed_chunks(300)
    truth = slow.prefill_times(75, 4)
    planner.observe(ROUTE, [75] * 4, 0.0, [truth.first + truth.delays + i * truth.bottleneck for i in range(4)])
    assert len(planner.chunks(ROUTE, 300)) >= 8


def test_links_100x_slower_than_assumed_are_not_taken_for_slow_peers():
    """The tiny model's route at an assumed 100 Mbit/s: its peers' compute carries most of a chunk.
    The links really carry 1 Mbit/s; blaming the peers would need CPUs 100x slower than they
    measured themselves (and made the whole prompt look best), so the links are what is slow, and
    after one prompt in the rule's 2 chunks the next goes in 8 (the WAN bed: 780 -> 555-612 ms)."""
    planner = planner_for(keep_route_blind=0.10, row_bytes=276, hop_seconds=0.0012)
    truth = wan_route(rate=1.25e5, row_bytes=276, hop_seconds=0.0012)
    assert not planner.costs(ROUTE).mostly_links(64)
    plans = []
    for _ in range(3):
        sizes = planner.chunks(ROUTE, 128)
        plans.append(len(sizes))
        times = truth.prefill_times(max(sizes), len(sizes))
        planner.observe(ROUTE, sizes, 0.0, [times.first + times.delays + i * times.bottleneck for i in range(len(sizes))])
    assert plans == [2, 8, 8]


def test_a_route_the_predictions_do_not_explain_keeps_the_rule():
    """Where even the model fitted to a route's answers misses their time (loopback on a busy box:
    3 peers and the client on 2 cores), its predicted gains are not trusted: the rule's count stays.
    Here the answers come at the predicted spacing but the whole prompt takes 3x the predicted time."""
    planner, route = planner_for(keep_route_blind=0.10, fixed=0.05), wan_route(fixed=0.05)
    assert planner.chunks(ROUTE, 300) == [300]  # predicted alone: fixed costs dwarf the work
    for _ in range(3):
        spacing = route.prefill_times(75).bottleneck
        planner.observe(ROUTE, [75] * 4, 0.0, [3 * route.prefill_times(75, 4).first + i * spacing for i in range(4)])
    assert planner.measured[("a[0:2)", "b[2:4)", "c[4:6)")].error() > 0.5
    assert planner.chunks(ROUTE, 300) == fixed_chunks(300)


def test_fixed_costs_that_dwarf_the_work_keep_a_prompt_whole():
    assert planner_for(fixed=0.05).chunks(ROUTE, 256) == [256]


def test_batch_rows_count_like_tokens():
    planner = planner_for(rate=2.5e6)
    assert len(planner.chunks(ROUTE, 128, batch=8)) > len(planner.chunks(ROUTE, 128, batch=1))


def observe_pipeline(planner: PrefillPlanner, costs: PipelineCosts, rows: int, chunks: int = 3) -> None:
    """A prompt of `chunks` x `rows` as the route `costs` would answer it."""
    times = costs.prefill_times(rows)
    first = 100.0 + times.first + times.delays
    planner.observe(ROUTE, [rows] * chunks, started=100.0,
                    answers=[first + i * times.bottleneck for i in range(chunks)])


def test_a_link_slower_than_assumed_is_measured_and_the_next_prompt_goes_in_more_chunks():
    """The client assumes 100 Mbit/s; the route really carries 10: the spacing of a prompt's
    answers shows it, and the next prompt hides the bytes behind more, smaller chunks."""
    planner = planner_for()
    before = len(planner.chunks(ROUTE, 512))
    observe_pipeline(planner, wan_route(rate=1.25e6), 64)
    assert len(planner.chunks(ROUTE, 512)) > before
    assert planner.measured[("a[0:2)", "b[2:4)", "c[4:6)")].prompts == 1


def test_a_bottleneck_with_larger_fixed_costs_than_predicted_means_fewer_chunks():
    """Every step costs each process ~5 ms more than predicted (a slow CPU, cold caches): chunks of
    two sizes tell that fixed cost from the cost per row, and chunks merge."""
    planner = planner_for()
    before = len(planner.chunks(ROUTE, 1024))
    for rows in (64, 128):
        observe_pipeline(planner, wan_route(fixed=0.005), rows)
    first, bottleneck = planner.model(ROUTE)
    assert 0.004 < bottleneck.fixed < 0.007
    assert len(planner.chunks(ROUTE, 1024)) < before


def test_what_cannot_be_a_measurement_is_ignored():
    planner = planner_for()
    planner.observe(ROUTE, [64, 64], started=5.0, answers=[4.0, 6.0])  # answered before it was sent
    planner.observe(ROUTE, [64, 64], started=0.0, answers=[1.0])  # an answer missing
    planner.observe(ROUTE, [8, 8], started=0.0, answers=[1.0, 1.1])  # too short to say anything about rows
    assert planner.measured.get(("a[0:2)", "b[2:4)", "c[4:6)")) is None
    planner.observe(ROUTE, [64], started=0.0, answers=[1.0])  # one chunk: no spacing, but a time to predict
    seen = planner.measured[("a[0:2)", "b[2:4)", "c[4:6)")]
    assert seen.spacings == [] and len(seen.errors) == 1 and seen.errors[0] > 1  # 1 s: far off the prediction


def test_one_spacing_far_off_its_neighbours_does_not_move_the_plan():
    """Seen on the WAN bed: a two-chunk prompt's one gap was 67 ms among 8-15 ms ones (a lost
    packet's retransmission). Each size's median stands for it, so the next plan stays put."""
    steady, upset = planner_for(), planner_for()
    truth = wan_route(rate=1.25e6)
    for planner in (steady, upset):
        for _ in range(2):
            observe_pipeline(planner, truth, 64, chunks=2)
    upset.observe(ROUTE, [64, 64], started=0.0, answers=[0.1, 0.1674])
    assert steady.chunks(ROUTE, 1024) == upset.chunks(ROUTE, 1024)
    first, bottleneck = upset.model(ROUTE)
    assert abs(bottleneck.at(64) - truth.prefill_times(64).bottleneck) < 1e-4
    assert first.per_row >= bottleneck.per_row  # a chunk's way around the route includes its bottleneck


def test_links_faster_than_assumed_are_measured_and_the_next_prompt_goes_in_fewer_chunks():
    planner = planner_for(rate=1.25e6)
    before = len(planner.chunks(ROUTE, 512))
    observe_pipeline(planner, wan_route(rate=12.5e6), 64)
    assert len(planner.chunks(ROUTE, 512)) < before


def test_answers_that_come_as_fast_for_any_chunk_size_do_not_send_a_long_prompt_whole():
    """Seen on the WAN bed: a prompt's answers ~1.5 ms apart whether its chunks had 64 or 341 rows
    (no cost per row to see at the bottleneck). That says the links are fast, not that the route's
    work per row is nothing: a 1024-token prompt still goes in chunks."""
    planner = planner_for()
    planner.observe(ROUTE, [64, 64], started=0.0, answers=[0.1, 0.1015])
    planner.observe(ROUTE, [341, 341, 342], started=0.0, answers=[0.1, 0.1016, 0.1031])
    assert 1 < len(planner.chunks(ROUTE, 1024))


def test_chunks_of_one_size_are_varied_once_so_fixed_costs_are_told_from_slow_links():
    """Prompts of one length give spacings at one chunk size, which cannot say whether a bottleneck
    is slow per chunk (fixed costs) or per row (a slow link). The planner then tries another size
    where that costs little; with both, a route whose every step costs ~5 ms more than predicted
    ends with fewer, larger chunks than it started with."""
    planner, truth = planner_for(), wan_route(fixed=0.005)
    start = len(planner.chunks(ROUTE, 1024))
    counts = []
    for _ in range(6):
        sizes = planner.chunks(ROUTE, 1024)
        counts.append(len(sizes))
        observe_pipeline(planner, truth, max(sizes), chunks=len(sizes))
    assert len(set(counts)) > 1  # it did try another size
    assert len(planner.chunks(ROUTE, 1024)) < start


def test_answers_closer_than_any_fixed_cost_mean_links_faster_than_assumed():
    planner = planner_for(rate=1.25e6)
    prior_first, _ = planner.model(ROUTE)
    planner.observe(ROUTE, [64, 64], started=0.0, answers=[0.1, 0.1002])
    first, bottleneck = planner.model(ROUTE)
    assert bottleneck.per_row == 0 and first.per_row < prior_first.per_row / 4


def test_peers_slower_than_announced_are_measured_as_compute_and_prompts_go_in_more_chunks():
    """A route of slow CPUs (SmolLM2-like: the peers' compute is the bottleneck, not the links) whose
    peers are 2x slower than announced: every hop's work per row is, so more of it overlaps with
    more chunks (blaming the links instead would under-chunk: seen on the WAN bed, 5-7 vs 8)."""
    planner = planner_for(hop_seconds=0.024, row_bytes=2304)
    before = len(planner.chunks(ROUTE, 1024))
    truth = wan_route(hop_seconds=0.048, row_bytes=2304)
    for rows in (128, 256):
        observe_pipeline(planner, truth, rows)
    first, _ = planner.model(ROUTE)
    assert first.per_row > 1.5 * planner_for(hop_seconds=0.024, row_bytes=2304).model(ROUTE)[0].per_row
    assert len(planner.chunks(ROUTE, 1024)) >= before


# ------------------------------------------------------------------ what peers announce a chunk costs

def test_a_peer_fits_what_its_prompt_chunks_cost_per_token():
    """PrefillCost: seconds per block = fixed + per_token x tokens, through what the peer ran."""
    cost = PrefillCost([(32, 0.0010), (128, 0.0022)])  # measured at start: 0.6 ms + 12.5 us/token
    line = cost.line()
    assert abs(line.fixed - 0.0006) < 1e-9 and abs(line.per_row - 12.5e-6) < 1e-12
    for tokens in (64, 256, 512):  # the peer then ran chunks 2x as costly per token (it got busy)
        cost.observe(tokens, blocks=2, seconds=2 * (0.0006 + 25e-6 * tokens))
    learned = cost.line()
    assert 20e-6 < learned.per_row < 30e-6  # what it ran outweighs the two start measures
    cost.observe(8, blocks=2, seconds=5.0)  # decode-sized forwards say nothing about chunks
    cost.observe(64, blocks=2, seconds=0.0)
    assert cost.line() == learned
    assert PrefillCost().line() is None
    one_size = PrefillCost()
    one_size.observe(100, blocks=1, seconds=0.001)
    assert one_size.line() == Line(0.0, 1e-5)  # one size cannot split fixed from per token: all per token
    noisy = PrefillCost([(32, 0.0020), (128, 0.0015)])  # a burst of other work slowed the small probe
    assert noisy.line() == Line(0.0, 0.00175 / 80)  # more tokens never cost less: through zero and the mean


def test_a_hop_that_announced_its_prefill_line_is_planned_with_it_not_the_decode_curve():
    """The decode curve (flat for 8 rows, then +1 per 28) is no prompt chunk's cost: a CPU prefill is
    nearly linear in tokens. A hop with an announced line costs fixed + its line per chunk."""
    decode_only = Stage("hop", 0.001, BLOCKS_CURVE, "10.0.0.1", STEP_OVERHEAD)
    measured = Stage("hop", 0.001, BLOCKS_CURVE, "10.0.0.1", STEP_OVERHEAD, chunk=Line(0.0002, 1e-5))
    assert decode_only.chunk_busy(256) == decode_only.busy(256)
    assert measured.chunk_busy(256) == STEP_OVERHEAD + 0.0002 + 256e-5
    assert measured.busy(1) == decode_only.busy(1)  # decode steps (micro-batches) keep the curve
    costs = PipelineCosts([measured, Stage("link", 1e-6, LINEAR, None, link=True)], [0.01], {})
    assert costs.prefill_times(100).first == measured.chunk_busy(100) + 1e-4
    assert not costs.mostly_links(100)


def test_route_costs_read_the_line_from_each_hops_record():
    from molink.crypto.identity import Identity
    from molink.dht.records import SpanRecord
    from molink.swarm.pipeline_cost import route_costs
    from molink.swarm.routing import RouteHop

    def hop(start, end, prefill_cost):
        record = SpanRecord.create(Identity.generate(), "a" * 40, start, end, ["/ip4/10.0.0.1/tcp/1"], 1000.0, 100,
                                   "v", prefill_cost=prefill_cost)
        return RouteHop(record, start, end)

    costs = route_costs([hop(0, 4, (0.001, 2e-5)), hop(4, 6, None)], hidden_size=64, head_seconds=0.0001, rtts={},
                        compute_speed=2.0)
    announced, silent = costs.stages[1], costs.stages[2]
    assert announced.chunk == Line(4 * 0.001 / 2, 4 * 2e-5 / 2)  # the hop's blocks, at the speed asked
    assert silent.chunk is None and silent.chunk_busy(64) == silent.busy(64)


def test_a_chunk_sharing_a_machine_with_the_chunks_behind_it_goes_slower_than_alone():
    """3 peers on a 2-core machine (the client's, on loopback): while the first chunk goes around,
    later chunks keep the other peers busy on the same cores, so each of its stages runs 1.5x slower;
    a prompt sent whole has the machine to itself."""
    stages = [Stage("head", 0.0002, HEAD_CURVE, "client", STEP_OVERHEAD, prefill="once")]
    stages += [Stage(f"hop {i}", 0.001, BLOCKS_CURVE, "client", STEP_OVERHEAD, chunk=Line(0.001, 1e-5))
               for i in range(3)]
    shared = PipelineCosts(stages, [0.00025] * 4, {"client": 2})
    apart = PipelineCosts([replace(s, host=f"10.0.0.{i}") for i, s in enumerate(stages)], [0.00025] * 4, {})
    alone = shared.prefill_times(100, chunks=1).first
    assert abs(shared.prefill_times(100, chunks=2).first - 1.5 * alone) < 1e-12
    assert apart.prefill_times(100, chunks=8).first == apart.prefill_times(100, chunks=1).first == alone


def test_peers_naming_one_machine_share_its_cores_and_ours_is_the_clients():
    """Records name the machine a peer computes on (peer/machine.py): peers naming one compete for
    its announced cores whatever their addresses (network namespaces of one box), a peer naming the
    client's own shares the client's, and links between different addresses still cross a wire."""
    from molink.crypto.identity import Identity
    from molink.dht.records import SpanRecord
    from molink.peer.machine import machine_id
    from molink.swarm.pipeline_cost import CLIENT_HOST, route_costs
    from molink.swarm.routing import RouteHop

    from molink.peer.machine import device_name, machine_cores

    model = "a" * 40
    assert machine_id(model, "cpu") == machine_id(model, "cpu") != machine_id("b" * 40, "cpu")  # per swarm
    assert machine_id(model, "cuda:0") != machine_id(model, "cuda:1") != machine_id(model, "cpu")  # per device
    assert device_name("cuda") == "cuda:0" and device_name("cpu") == "cpu"
    assert machine_cores("cuda:1") == 1 and machine_cores("cpu") >= 1

    def hop(start, end, ip, machine="", cores=0):
        record = SpanRecord.create(Identity.generate(), model, start, end, [f"/ip4/{ip}/tcp/1"], 1000.0, 100, "v",
                                   prefill_cost=(0.001, 1e-5), machine=machine, machine_cores=cores)
        return RouteHop(record, start, end)

    box = "0123456789abcdef"
    costs = route_costs([hop(0, 2, "10.0.0.1", box, 4), hop(2, 4, "10.0.0.2", box, 4), hop(4, 6, "10.0.0.3")],
                        hidden_size=64, head_seconds=0.0001, rtts={}, client_cores=2)
    hops = costs.stages[1:4]
    assert hops[0].host == hops[1].host == f"machine {box}" != hops[2].host == "10.0.0.3"
    assert costs.cores[f"machine {box}"] == 4
    assert all(stage.host is None for stage in costs.stages[4:])  # every link crosses a wire
    ours = route_costs([hop(0, 6, "10.0.0.1", machine_id(model, "cpu"), 8)], hidden_size=64, head_seconds=0.0001,
                       rtts={}, client_cores=2)
    assert ours.stages[1].host == CLIENT_HOST and ours.cores[CLIENT_HOST] == 2  # the client's own count
