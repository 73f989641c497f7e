import torch

import qcompile
from qcompile.passes import ActivationStats
from models_for_tests import tiny_opt


def test_stats_match_hooks_on_eager_model():
    model = tiny_opt()
    calib = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    gm = qcompile.compile(model, passes=[ActivationStats()], calibration=calib)
    stats = gm.qcompile_analyses["activation_stats"]
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    assert set(stats) == set(seen)
    for name, xs in seen.items():
        x = torch.cat(xs)
        st = stats[name]
        assert torch.allclose(st.absmax, x.abs().amax(0), atol=1e-6)
        assert torch.allclose(st.min, x.amin(0), atol=1e-6) and torch.allclose(st.max, x.amax(0), atol=1e-6)
        assert torch.allclose(st.mean_abs, x.abs().mean(0), atol=1e-5)
        assert st.tokens == 30
    # linears reading one tensor share one statistics object
    q, k = (stats[f"model.decoder.layers.0.self_attn.{p}_proj"] for p in "qk")
    assert q is k
