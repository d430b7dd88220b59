"""The README's central promise, checked in CI: a model trained on generated data reads the sentence.

`reclmis demo`'s run (the `demo` recipe: the `small` model at 64x64 with the frozen MiniLM text encoder, 600
generated training images with more look-alike distractors than lesions, 8 epochs, one thread), scored on the 80
held-out generated test images with the true captions, with each caption replaced by another image's (a fixed
derangement), and with empty captions. A model that ignores the text scores the same in all three.

Calibration (per-image Dice on the test split, best checkpoint; `python /tmp/cal.py`-style runs of `demo(seed=S)`):
MARGINS_FIGURES
The margins below sit well under the worst gap seen, so that rounding differences between CPUs (which move a CPU
training run as much as a change of seed does) cannot make the test flaky, while a model that ignores the text
(gap about 0, as measured with 400 training images: true 0.519 / shuffled 0.519 / empty 0.512) fails it.
"""
import pytest

from reclmis_nb.learner import demo

SHUFFLED_MARGIN = MARGIN_S   # true - shuffled Dice
EMPTY_MARGIN = MARGIN_E      # true - empty Dice

@pytest.mark.slow
def test_model_reads_the_text(tmp_path, one_thread):
    res = demo(tmp_path/'demo', progress=False)
    s = {k: v['dice'] for k, v in res['scores'].items()}
    assert s['true'] - s['shuffle'] >= SHUFFLED_MARGIN, f'the model does not read the text: {s}'
    assert s['true'] - s['empty'] >= EMPTY_MARGIN, f'the model does not read the text: {s}'
