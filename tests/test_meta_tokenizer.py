"""Meta's own Llama 3 ``tokenizer.model`` (the llama-models==0.3.0 wheel, tests/meta_assets.py) with
the real 128,256-token vocabulary: the training layout equals the original pipeline's (Meta's
reference tokenizer on the whole chat string), the exported ``tokenizer.json`` encodes like
torchtune's tokenizer, its chat template gives the training prompt ids, and torchtune's built-in
special tokens (``tokenizer.special_tokens_path`` unset) serve, as does an HF ``tokenizer.json``."""

import json
from pathlib import Path

import pytest
from converter_sample import RECORD
from meta_assets import TOKENIZER, reference_tokenizer

from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout
from gdt_tune.data.synthetic import generate_cohort
from gdt_tune.datasets import cgdb_instruct_dataset
from gdt_tune.trained.serving import write_serving_files

transformers = pytest.importorskip("transformers")
VOCAB = 128_256  # Llama-3.1-8B-Instruct's embedding rows

pytestmark = pytest.mark.xdist_group("meta_tokenizer")  # one worker builds the 128k-token tokenizers


@pytest.fixture(scope="module")
def meta_tokenizer(meta_assets):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(str(meta_assets / TOKENIZER))  # torchtune's built-in special tokens


@pytest.fixture(scope="module")
def reference(meta_assets):
    return reference_tokenizer(meta_assets)


@pytest.fixture(scope="module")
def records():
    """The hand-written converter sample and synthetic samples in the converter's wording."""
    return [RECORD] + [s for _, s in generate_cohort(8, seed=11, splits_per_lot=1)]


def _served(folder, meta_assets, tokenizer):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB}))
    write_serving_files(folder, meta_assets / TOKENIZER, tokenizer, DEFAULT_SYSTEM_PROMPT, 8000, VOCAB)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def served(meta_assets, meta_tokenizer, tmp_path_factory):
    return _served(tmp_path_factory.mktemp("meta") / "served", meta_assets, meta_tokenizer)


def chat_string(system: str, instruction: str, answer: str) -> str:
    """The original pipeline's training text, rendered independently of gdt_tune (spec §5)."""
    def turn(role, text):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"
    return "<|begin_of_text|>" + turn("system", system) + turn("user", instruction) + turn("assistant", answer)


def test_layout_equals_the_original_pipeline(meta_tokenizer, reference, records, tmp_path):
    """Every sample through the dataset builder gives Meta's reference encoding of the whole chat
    string (cut at 8000 as GDT did), labels -100 before the assistant header."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = cgdb_instruct_dataset(meta_tokenizer, data_files=str(data), max_seq_len=8000)
    assert len(ds) == len(records)
    start_header = reference.special_tokens["<|start_header_id|>"]
    for i, record in enumerate(records):
        want = reference.encode(chat_string(DEFAULT_SYSTEM_PROMPT, record["instruction"], record["answer"]),
                                bos=False, eos=False, allowed_special="all")[:8000]
        sample = ds[i]
        assert sample["tokens"] == want, ds.where(i)
        header = [k for k, t in enumerate(want) if t == start_header][2]  # the assistant turn's header
        assert sample["labels"] == [-100] * header + want[header:]
    assert max(max(ds[i]["tokens"]) for i in range(len(ds))) < VOCAB


CLINICAL = [
    "hemoglobin [mass per volume] in blood - 718-7 is 12.50 g/dL, platelets 1,234.5 ×10⁹/L, creatinine 0.92 mg/dl",
    "\tPD-L1 tumor proportion score is <1%,\n\tEGFR is L858R,\n\t</genetic>.\n",
    "Müller-Lüdenscheidt, São Paulo, Zürich: naïve café; 中文 病历; µmol/L, ≥ 3 × ULN, −0.5 SD, 37.5 °C 🙂",
    "0 weeks later, the patient visited and experienced the following: \n\tdeath.\n\n\n\n\nHere we repeat",
    "12345678901234567890 -17.25e-3 1e6 3/4 1:200 07:30 2021-03-29 +1.0",
    "   leading spaces\t\ttabs\r\nwindows line\n\n\n\ntrailing   ",
    # 30k-character lines: one visit's items on one line, and a long run of numbers and units
    ", ".join(f"lab {k} - {1000 + k}-7 is {k * 0.37:.2f} mg/dl" for k in range(1100)),
    " ".join(f"{k}.{k % 7}µg" for k in range(4000)),
]


def test_exported_tokenizer_encodes_like_torchtune(served, meta_tokenizer, records):
    texts = CLINICAL + [r["instruction"] for r in records[:3]] + [r["answer"] for r in records[:3]]
    assert max(map(len, CLINICAL[-2:])) >= 30_000
    for text in texts:
        ids = meta_tokenizer.encode(text, add_bos=False, add_eos=False)
        assert served.encode(text, add_special_tokens=False) == ids, text[:60]
        assert served.decode(ids) == text


def test_chat_template_gives_the_training_prompt_ids(served, meta_tokenizer, records):
    layout = Layout.build(meta_tokenizer, DEFAULT_SYSTEM_PROMPT)
    for record in records:
        want = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
        messages = [{"role": "user", "content": record["instruction"]}]
        got = served.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert (got["input_ids"] if not isinstance(got, list) else got) == want


def test_torchtunes_builtin_special_tokens_serve(served, meta_tokenizer, meta_assets):
    """torchtune's built-in Llama 3 set leaves 128011 empty and puts <|image|> at 128256: every token
    the model can embed keeps its training id, the gap is a placeholder no text holds, nothing is
    past the vocabulary."""
    specials = meta_tokenizer.special_tokens
    assert specials["<|image|>"] == VOCAB and 128011 not in specials.values()  # the trap itself
    folder = Path(served.name_or_path)
    saved = json.loads((folder / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in saved["added_tokens"]}
    assert sorted(added) == list(range(128_000, VOCAB))
    assert added[128011] == "<|unused_id_128011|>" and "<|image|>" not in added.values()
    for name, token_id in specials.items():
        if token_id < VOCAB:
            assert added[token_id] == name and served.convert_tokens_to_ids(name) == token_id
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert {int(i) for i in config["added_tokens_decoder"]} == set(added)
    assert served.encode("<|eot_id|>", add_special_tokens=False) == [specials["<|eot_id|>"]]


def test_an_hf_tokenizer_json_as_special_tokens_path_serves(meta_assets, reference, records, tmp_path):
    """``tokenizer.special_tokens_path`` = Meta's own layout of special tokens in an HF tokenizer.json
    (128000..128255, <|image|> at 128011): the same ids in the served folder, the same prompt ids."""
    from torchtune.models.llama3 import llama3_tokenizer

    hf_json = tmp_path / "tokenizer.json"
    hf_json.write_text(json.dumps({"added_tokens": [{"id": i, "content": n, "special": True}
                                                    for n, i in reference.special_tokens.items()]}))
    tokenizer = llama3_tokenizer(str(meta_assets / TOKENIZER), special_tokens_path=str(hf_json))
    assert tokenizer.special_tokens == reference.special_tokens
    served = _served(tmp_path / "served", meta_assets, tokenizer)
    assert {n: served.convert_tokens_to_ids(n) for n in reference.special_tokens} == reference.special_tokens
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    record = records[0]
    got = served.apply_chat_template([{"role": "user", "content": record["instruction"]}],
                                     add_generation_prompt=True, tokenize=True)
    assert (got["input_ids"] if not isinstance(got, list) else got) == [
        *layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
