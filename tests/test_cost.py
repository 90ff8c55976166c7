"""The step-cost counter (``d2v_fast/cost.py``): what it calls a kernel, a sync and a cast, and
that its emulation of the CUDA path leaves the update's values alone."""
import contextlib

import torch

from d2v_fast import cost

FLAG_LINE = next(i for i, line in enumerate(open(cost.__file__.replace("cost.py", "trainer.py")), 1)
                 if "self._flag_wait(pending)" in line)


def test_counter_kinds():
    x = torch.randn(4, 8)
    host = torch.tensor([True, False, True, True])
    with cost.CostCounter() as c:
        c.host([host])
        y = x.t().view(8, 4)  # views: ops, no kernels
        z = (x * 2).sum()  # two kernels
        int(host.sum())  # a host tensor's value: no sync
        float(z)  # a device tensor's value: a sync
        x[x[:, 0] > 0]  # a boolean index with a device mask: a sync
        x.to(torch.bfloat16)  # a cast
    assert y.shape == (8, 4)
    t = c.totals()
    # t, view, mul, sum, sum, 2 x _local_scalar_dense, select, gt, index, _to_copy; no kernel for
    # the 3 views (t, view, select) and the 2 scalar reads
    assert t["ops"] == 11 and t["kernels"] == 6
    assert t["syncs"] == 2 and t["sync_ops"] == {"aten::_local_scalar_dense": 1, "aten::index": 1}
    assert t["casts"] == 1


def test_multi_tensor_launches_follow_the_chunking():
    small = [torch.empty(10)] * 200
    assert cost._multi_tensor_launches((small,)) == 2  # 110 tensors a launch for one list
    assert cost._multi_tensor_launches((small, small, small, small)) == 6  # 36 for four
    big = [torch.empty(321 * 65536)]
    assert cost._multi_tensor_launches((big,)) == 2  # 320 chunks a launch


def test_emulated_cuda_path_computes_the_same_update():
    """The counted update (Triton launches stubbed, the twins computing) gives the loss and
    weights of a plain CPU update, for both recipes."""
    for recipe in ("data2vec", "data2vec2"):
        cfg = cost.cost_config("text", recipe, "tiny", dtype="float32")
        cfg.model.dropout = cfg.model.attention_dropout = 0.0
        out = []
        for emulate in (False, True):
            torch.manual_seed(0)
            with cost.cuda_path_on_cpu() if emulate else contextlib.nullcontext():
                step, batch = cost._make("d2v_fast", cfg, torch.device("cpu"), 1024)
                step(batch)
                out.append({k: v.clone() for k, v in step.trainer.model.state_dict().items()})
        for k in out[0]:
            torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-5, atol=1e-6, msg=k)


def test_engine_defaults_sync_once_and_dispatch_fewer_ops_than_without_switches():
    cfg = cost.cost_config("text", "data2vec2", "tiny")
    on = cost.measure_cost("d2v_fast", cfg, time_it=False)
    off_cfg = cost.cost_config("text", "data2vec2", "tiny", skip_on_device=False, host_counts=False,
                               cast_once=False, fused_qkv=False, bf16_teacher=False, bf16_student=False)
    off = cost.measure_cost("d2v_fast", off_cfg, time_it=False)
    # no wait inside an update: the finite flag is read in the next update (trainer.settle())
    assert on["finite"] and on["syncs"] == 0, on["sync_sites"]
    assert off["syncs"] > 0 and on["ops"] < off["ops"] and on["casts"] < off["casts"]



def test_a_flag_read_in_its_own_update_counts_as_a_sync():
    """The counter still sees the wait when the host reads an update's flag before the next
    update (what the loop does on the updates it logs): one event wait, at the settle."""
    cfg = cost.cost_config("text", "data2vec", "tiny")
    with cost.cuda_path_on_cpu():
        step, batch = cost._make("d2v_fast", cfg, torch.device("cpu"), 1024)
        step(batch)
        counter = cost.CostCounter()
        counter.host(batch)
        cost.STATE.counter = counter
        try:
            with cost._moves_to_device(counter), counter:
                step(batch)
                assert step.trainer.settle() is True
        finally:
            cost.STATE.counter = None
    t = counter.totals()
    assert t["syncs"] == 1 and list(t["sync_sites"]) == [f"cuda event wait at trainer.py:{FLAG_LINE}"], t


def test_stack_graphs_host_side_replays_three_graphs_an_update():
    """``--train.compile stack-cudagraphs`` as the counter sees it (``cost.GraphsOnHost``): the
    two stacks' kernels leave the host's count, three graph launches (the student's forward
    and backward, the teacher's forward) take their place, and no sync comes in."""
    cfg = cost.cost_config("text", "data2vec", "tiny")
    plain = cost.measure_cost("d2v_fast", cfg, time_it=False)
    cfg.train.compile = "stack-cudagraphs"
    graphed = cost.measure_cost("d2v_fast", cfg, time_it=False)
    assert graphed["graph_launches"] == 3 and plain["graph_launches"] == 0
    assert graphed["syncs"] == 0 and graphed["finite"]
    assert graphed["ops"] < 0.6 * plain["ops"] and graphed["kernels"] < 0.6 * plain["kernels"]  # tiny: 4 blocks a stack
