"""training.evaluation: the perception metrics logged during RL on scene-world rollouts."""

import numpy as np
import pytest

from vlcal_jax.data import Example, scenes
from vlcal_jax.training import evaluation


def test_perception_metrics_align_rows_by_index_in_a_mixed_batch():
    # 3 prompts x n = 2: rows 0-1 have no scene facts, rows 2-5 do. Rows 2 and 4 see the scene
    # right, rows 3 and 5 misread it; both scores rank them perfectly on the scene rows only.
    samples = scenes.generate_samples(2, seed=5)
    plain = Example(id="plain", question="What is 2 + 2?", images=[], answer="4")
    examples = [plain] + [s.to_example() for s in samples]
    texts = ["<think><vision>nothing</vision></think>\\boxed{4}"] * 2
    for sample in samples:
        texts += [scenes.teacher_response(sample), scenes.teacher_response(sample, vision_error=True)]
    rewards = {"soft_label": np.array([0.1, 0.9, 0.9, 0.1, 0.8, 0.2]),
               "vision_confidence": np.array([0.0, 1.0, 0.7, 0.3, 0.6, np.nan])}
    out = evaluation.perception_metrics(texts, examples, 2, rewards)
    assert out["perception/correct"] == pytest.approx(0.5)
    assert out["perception/auroc_soft_label"] == pytest.approx(1.0)
    assert out["perception/auroc_vision_confidence"] == pytest.approx(1.0)
    assert evaluation.perception_metrics(texts[:2], [plain], 2, rewards) == {}
    # rlcr / plain responses have no <vision> span: perception is unknown, not 0 (wrong)
    for mode in ("rlcr", "plain"):
        assert evaluation.perception_metrics(texts, examples, 2, rewards, mode=mode) == {}
