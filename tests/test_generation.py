"""Forecast generation: one prefill shared by every draw; the greedy draw equals the reference
(a prefill per draw, torchtune's generate), and the sampled draws depend only on the seed."""

import pytest
import torch

from gdt_tune.data.layout import Layout
from gdt_tune.eval.evaluate import read_samples
from gdt_tune.eval.generation import generate_draws, pick_tokens
from gdt_tune.eval.reference import generate_answers
from gdt_tune.trained.serving import TEMPERATURE, TOP_P


def test_greedy_draw_equals_a_prefill_per_draw(demo_dir):
    from recipe_utils import load_trained

    model, tok, prompt = load_trained(demo_dir / "model", None, torch.device("cpu"), torch.float32)
    layout = Layout.build(tok, prompt)
    prompts = [[*layout.prompt_tokens(r["instruction"]), *layout.assistant_header]
               for _, r in read_samples(demo_dir / "data" / "test", 6)]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    cpu, fp32 = torch.device("cpu"), torch.float32
    draws = [(0.0, 1.0)] + [(TEMPERATURE, TOP_P)] * 3
    for start in (0, 3):
        batch = prompts[start:start + 3]
        reference = generate_answers(model, tok, batch, 40, 0.0, 1.0, cpu, fp32)
        got = generate_draws(model, batch, draws, 40, tok.pad_id, tok.eot_id, torch.Generator().manual_seed(1), cpu, fp32)
        assert [tok.decode(d[0]) for d in got] == reference
        assert all(len(d) == 4 for d in got) and got[0][1] != got[0][2]  # the draws differ from each other
        again = generate_draws(model, batch, draws, 40, tok.pad_id, tok.eot_id, torch.Generator().manual_seed(1), cpu,
                               fp32)
        assert again == got
        # every draw row reads its own prompt's cache: three greedy draws of each prompt agree with the reference
        greedy = generate_draws(model, batch, [(0.0, 1.0)] * 3, 40, tok.pad_id, tok.eot_id, torch.Generator(), cpu,
                                fp32)
        assert [[tok.decode(d) for d in rows] for rows in greedy] == [[text] * 3 for text in reference]


def test_pick_tokens_greedy_top_p_and_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 0.5, 1.0, 1.0])
    # row 0 greedy; row 1 keeps only the top token; row 2: cdf 0.6, 0.9, 1.0 -> u=0.75 picks the 2nd most likely
    # row 3: u=0.95 picks the least likely (0.2)
    got = pick_tokens(logits, temperature, top_p, torch.tensor([0.99, 0.99, 0.75, 0.95]))
    assert got.tolist() == [1, 1, 2, 1]
    assert pick_tokens(logits, temperature, top_p, torch.tensor([0.0, 0.0, 0.0, 0.0])).tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("top_p", [0.85])
def test_sampled_frequencies_follow_the_top_p_distribution(top_p):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    picks = pick_tokens(probs.log().expand(n, 4), torch.ones(n), torch.full((n,), top_p), u)
    freq = torch.bincount(picks, minlength=4).double() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95  # 0.05 is outside the smallest set reaching 0.85
    assert torch.allclose(freq, expected.double(), atol=0.015)
