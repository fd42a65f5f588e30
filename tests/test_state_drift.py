"""The state-drift measurement (`gere-ds states`): hand cases, agreement with the TM loss's own
violation function, and the command on the tiny model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gere_ds.commands.states import main as states_main
from gere_ds.evaluation.state_drift import (Drift, Thresholds, fit_thresholds, measure,
                                            final_norm_outputs, tri_states)
from gere_ds.training.losses import tm_violations


def _thresholds(lo: list[float], hi: list[float]) -> Thresholds:
    lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
    return Thresholds(lo=lo_t, hi=hi_t, mu=(lo_t + hi_t) / 2, sigma=(hi_t - lo_t) / 2)


def test_fit_thresholds_is_mean_and_population_std_over_real_tokens():
    hidden = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [99.0, -99.0]]])  # last token is padding
    mask = torch.tensor([[True, True, False]])
    t = fit_thresholds([(hidden, mask)], k=2.0)
    assert t.mu.tolist() == [2.0, 10.0]
    assert t.sigma.tolist() == [1.0, 0.0]
    assert t.lo.tolist() == [0.0, 10.0] and t.hi.tolist() == [4.0, 10.0]


def test_tri_states_at_and_beyond_the_thresholds():
    t = _thresholds([-1.0], [1.0])
    h = torch.tensor([[-2.0], [-1.0], [0.0], [1.0], [3.0]])
    assert tri_states(h, t).reshape(-1).tolist() == [-1, -1, 0, 1, 1]


def test_drift_counts_each_transition_and_measures_in_sigmas():
    # one dimension, lo = -1, hi = 1, sigma = 1
    t = _thresholds([-1.0], [1.0])
    base = torch.tensor([[0.0], [0.0], [2.0], [2.0], [-2.0], [0.5]])
    now = torch.tensor([[0.0], [1.5], [0.5], [-3.0], [-2.0], [0.5]])
    d = Drift()
    d.add(base, now, t)
    s = d.summary()
    # flips: 0 -> +1 (violation 0.5), +1 -> 0 (violation 0.5), +1 -> -1 (violation 4)
    assert d.flipped == 3 and s["elements"] == 6
    assert s["flipped_pct"] == pytest.approx(50.0)
    assert s["from_0_pct"] == pytest.approx(100 / 6)
    assert s["to_0_pct"] == pytest.approx(100 / 6)
    assert s["sign_pct"] == pytest.approx(100 / 6)
    assert s["violation_per_flip_sigma"] == pytest.approx((0.5 + 0.5 + 4.0) / 3)
    assert s["mean_shift_sigma"] == pytest.approx((0 + 1.5 + 1.5 + 5 + 0 + 0) / 6)
    assert s["base_state_pct"] == pytest.approx({"-1": 100 / 6, "0": 50.0, "1": 100 / 3})


def test_drift_agrees_with_the_tm_loss_violations():
    """The measurement's flips and violations are the TM loss's violating elements and sums."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 16, generator=g)
    now = base + 0.4 * torch.randn(50, 16, generator=g)
    t = fit_thresholds([(base[None], torch.ones(1, 50, dtype=torch.bool))], k=1.0)
    d = Drift()
    d.add(base, now, t)
    v = tm_violations(now[None], tri_states(base, t)[None], t.lo, t.hi, torch.ones(1, 50))
    assert d.flipped == int((v > 0).sum()) > 0
    assert d.violation_sigmas == pytest.approx(float((v[0] / t.sigma).sum()), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tiny_paths):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_paths["model"], dtype=torch.float32).eval()


def test_a_model_against_itself_flips_nothing(tiny_model):
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    base_out = list(final_norm_outputs(tiny_model, rows, pad_id=0, batch_size=2))
    t = fit_thresholds(base_out, k=1.0)
    s = measure(tiny_model, rows, base_out, t, pad_id=0, batch_size=2).summary()
    assert s["elements"] == 10 * 64
    assert s["flipped_pct"] == 0.0 and s["mean_shift_sigma"] == 0.0


def test_measure_refuses_base_outputs_of_other_rows(tiny_model):
    base_out = list(final_norm_outputs(tiny_model, [[5, 6, 7]], pad_id=0))
    t = fit_thresholds(base_out, k=1.0)
    with pytest.raises(ValueError, match="other rows"):
        measure(tiny_model, [[5, 6]], base_out, t, pad_id=0)


def test_command_finds_the_flips_of_a_perturbed_model(tiny_config, tiny_paths, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"], dtype=torch.float32)
    with torch.no_grad():  # the last layer's MLP output moves every final-norm element a little
        layer = model.model.layers[-1].mlp.down_proj
        layer.weight.add_(0.05 * torch.randn(layer.weight.shape,
                                             generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(changed)
    same = tmp_path / "same"
    shutil.copytree(tiny_paths["model"], same)
    out = tmp_path / "states"
    code = states_main(["--config", str(tiny_config()), "--out", str(out), "--samples", "5",
                        "--heldout", tiny_paths["replay"], f"same={same}", f"changed={changed}"])
    assert code == 0
    assert torch.is_grad_enabled()  # the command leaves the caller's autograd as it found it
    result = json.loads((out / "states.json").read_text())["models"]
    assert set(result) == {"same", "changed"} and set(result["same"]) == {"replay", "heldout"}
    assert result["same"]["replay"]["flipped_pct"] == 0.0
    assert result["changed"]["replay"]["flipped_pct"] > 0.0
    assert result["changed"]["heldout"]["mean_shift_sigma"] > 0.0
    assert "| changed | replay |" in (out / "states.md").read_text()
    # wider thresholds: fewer elements outside them, so fewer states to flip
    wide = tmp_path / "wide"
    assert states_main(["--config", str(tiny_config()), "--out", str(wide), "--samples", "5",
                        "--threshold-k", "3", f"changed={changed}"]) == 0
    doc = json.loads((wide / "states.json").read_text())
    assert doc["threshold_k"] == 3.0
    assert doc["models"]["changed"]["replay"]["flipped_pct"] < result["changed"]["replay"]["flipped_pct"]
    assert (out / "states.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, words", [(["noequals"], "NAME=MODEL_FOLDER"),
                                         (["x=/nonexistent"], "no config.json"),
                                         (["--threshold-k", "0", "x=y"], "--threshold-k")])
def test_command_refuses_bad_input_in_one_line(tiny_config, tmp_path, capsys, args, words):
    code = states_main(["--config", str(tiny_config()), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "o").exists()


def test_command_in_bfloat16_flips_nothing_on_the_same_model_and_names_a_bad_device(
        tiny_config, tiny_paths, tmp_path, capsys):
    """An 8B model is measured in bf16 on its GPU: the same path on the CPU here. The base
    model against a copy of itself, both in bf16 with the same batches, flips nothing."""
    same = tmp_path / "same"
    shutil.copytree(tiny_paths["model"], same)
    out = tmp_path / "bf16"
    assert states_main(["--config", str(tiny_config()), "--out", str(out), "--samples", "5",
                        "--dtype", "bfloat16", "--device", "cpu", f"same={same}"]) == 0
    doc = json.loads((out / "states.json").read_text())
    assert doc["models"]["same"]["replay"]["flipped_pct"] == 0.0
    capsys.readouterr()
    code = states_main(["--config", str(tiny_config()), "--out", str(tmp_path / "o"),
                        "--device", "nodevice", f"same={same}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--device" in err
