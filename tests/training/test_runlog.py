"""The summary a run ends with (rrepa.training.runlog.final_summary)."""

from pathlib import Path

import pytest

from rrepa.training.runlog import final_summary

EVAL = {"fid": 23.456, "num_samples": 5000, "feature_network": "fmnist-cnn@a46eda2ff3", "class_accuracy": 0.8712,
        "one_step_top1": 0.71, "bayes_top1": 0.842, "test_images": 2000}


@pytest.mark.parametrize("final_eval", [EVAL, None])
@pytest.mark.parametrize("latent", [False, True])
def test_final_summary_says_what_was_measured(final_eval, latent):
    text = final_summary(Path("runs/x"), 1200, 2.0, final_eval, 3.21456, latent, 0.0, "fmnist:train")
    lines = text.splitlines()
    assert lines[0] == "  samples      runs/x/samples/step-0001200.png (EMA weights, guidance 2; one column per class)"
    assert ("  FID          23.46 (5000 samples at guidance 0 against fmnist:train, feature network "
            "fmnist-cnn@a46eda2ff3)" in lines) == (final_eval is not None)
    assert any("class acc.   87.1 %" in line for line in lines) == (final_eval is not None)
    assert any("one-step top-1 71.0 %, Bayes top-1 84.2 % (2000 test images)" in line
               for line in lines) == (final_eval is not None)
    unit = "per latent dimension" if latent else "per pixel"
    assert f"  bits/dim     3.2146 (test split, null label, {unit}; bpd.json)" in lines
    assert lines[-1].startswith("  next         rrepa sample --ckpt runs/x")


def test_no_bits_per_dim_line_without_a_measurement():
    assert "bits/dim" not in final_summary(Path("r"), 5, 0.0, None, None, False, 0.0, "")


def test_final_summary_names_diverged_samples():
    text = final_summary(Path("r"), 5, 0.0, {**EVAL, "num_samples": 4990, "diverged": 10}, None, False, 0.0, "ref")
    assert "  FID          23.46 (4990 samples, 10 diverged and left out at guidance 0 against ref" in text
    text = final_summary(Path("r"), 5, 0.0, {**EVAL, "fid": None, "num_samples": 0, "diverged": 5000}, None, False,
                         0.0, "ref")
    assert "  FID          none: 5000 of 5000 samples diverged (NaN or inf)" in text.splitlines()
    text = final_summary(Path("r"), 5, 0.0, {**EVAL, "fid": None, "num_samples": 1, "diverged": 4999}, None, False,
                         0.0, "ref")  # one finite sample is no FID either, and is not "every sample"
    assert "  FID          none: 4999 of 5000 samples diverged (NaN or inf)" in text.splitlines()
