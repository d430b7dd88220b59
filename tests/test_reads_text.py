"""The README's central promise, checked in CI: a model trained on generated data reads the sentence.

`reclmis demo`'s run with 12 epochs instead of 8 (the `demo` recipe: the `small` model at 64x64 with the frozen
MiniLM text encoder, 600 generated training images with more look-alike distractors than lesions, one thread),
scored on the 80 held-out generated test images with the true captions, with each caption replaced by another
image's (a fixed derangement), and with empty captions. A model that ignores the text scores the same in all three.

Calibration on an AMD EPYC, 2 cores (8 epochs at be4c4aa, 12 epochs at f595956; no change to the arithmetic between): per-image Dice on the test split, best checkpoint,
`demo(epochs=12, seed=S)` (the training seed; the data are the same):

| seed | true  | shuffled | empty | true - shuffled | true - empty |
|------|-------|----------|-------|-----------------|--------------|
| 3407 | 0.803 | 0.282    | 0.431 | 0.52            | 0.37         |
| 1    | 0.663 | 0.419    | 0.082 | 0.24            | 0.58         |
| 2    | 0.736 | 0.388    | 0.283 | 0.35            | 0.45         |

Why 12 epochs: with the demo's own 8, seed 1 never left the text-ignoring saddle (0.525 / 0.526 / 0.524; seeds
3407 and 2 left it at epochs 5 and 7), and a model that ignores the text is exactly what this test must catch.
The margins sit at under half the worst gap seen (0.24 and 0.37), so that rounding differences between CPUs,
which move a CPU training run about as much as a change of seed does, cannot make the test flaky, while a
model that ignores the text (gaps of 0.001) fails it. The empty-caption score is the least stable figure (0.08 to
0.43 over the seeds): no training sentence is empty, so nothing pins what the model does with one.
"""
import pytest

from reclmis_nb.demo import demo

SHUFFLED_MARGIN = 0.10   # true - shuffled Dice (worst seed 0.24)
EMPTY_MARGIN = 0.10      # true - empty Dice (worst seed 0.37)
EPOCHS = 12

@pytest.mark.slow
def test_model_reads_the_text(tmp_path, one_thread):
    res = demo(tmp_path/'demo', epochs=EPOCHS, progress=False)
    s = {k: v['dice'] for k, v in res['scores'].items()}
    assert s['true'] - s['shuffle'] >= SHUFFLED_MARGIN, f'the model does not read the text: {s}'
    assert s['true'] - s['empty'] >= EMPTY_MARGIN, f'the model does not read the text: {s}'
