"""The paper recipe (configs/llama3.1-8b-long15.yaml) against the O-LoRA CL_Benchmark it claims to
reproduce: task order, paths, labels in their order (printed in the prompt's `Option:` line),
instructions; source truncation (`train.truncate_source`); O-LoRA's exact-match reading of
generated answers."""
from __future__ import annotations

from pathlib import Path

import pytest

from gere_ds.config.loading import load_config
from gere_ds.config.sections import TaskConfig
from gere_ds.data.encode import IGNORE, encode_example, encode_source
from gere_ds.data.prompts import build_prompt
from gere_ds.data.tasks import Example, load_examples
from gere_ds.errors import InputError
from gere_ds.evaluation import scoring as S

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "llama3.1-8b-long15.yaml"

# O-LoRA's instruction config (each string there ends with "\n", which build_prompt adds)
NLI = ('What is the logical relationship between the "sentence 1" and the "sentence 2"? '
       'Choose one from the option.')
SC = "What is the sentiment of the following paragraph? Choose one from the option."
TC = "What is the topic of the following paragraph? Choose one from the option."
QQP = ('Whether the "first sentence" and the "second sentence" have the same meaning? '
       'Choose one from the option.')
BOOLQA = ("According to the following passage, is the question true or false? "
          "Choose one from the option.")
MULTIRC = ("According to the following passage and question, is the candidate answer true or "
           "false? Choose one from the option.")
WIC = ("Given a word and two sentences, whether the word is used with the same sense in both "
       "sentence? Choose one from the option.")
SENTIMENT5 = ["very negative", "negative", "neutral", "positive", "very positive"]

# (name, folder under data/CL_Benchmark, labels = that folder's labels.json in its order,
#  instruction ("" = none), Option line printed) -- O-LoRA's long sequence, in training order
OLORA_LONG15 = [
    ("yelp", "SC/yelp", SENTIMENT5, SC, True),
    ("amazon", "SC/amazon", SENTIMENT5, SC, True),
    ("mnli", "NLI/MNLI", ["neutral", "entailment", "contradiction"], NLI, True),
    ("cb", "NLI/CB", ["entailment", "contradiction", "neutral"], NLI, True),
    ("copa", "COPA/COPA", ["A", "B"], "", False),
    ("qqp", "QQP/QQP", ["False", "True"], QQP, True),
    ("rte", "NLI/RTE", ["contradiction", "entailment"], NLI, True),
    ("imdb", "SC/IMDB", ["Good", "Bad"], SC, True),
    ("sst2", "SC/SST-2", ["Good", "Bad"], SC, True),
    ("dbpedia", "TC/dbpedia", ["Company", "Educational Institution", "Artist", "Athlete",
                               "Office Holder", "Mean of Transportation", "Building",
                               "Natural Place", "Village", "Animal", "Plant", "Album", "Film",
                               "Written Work"], TC, True),
    ("agnews", "TC/agnews", ["World", "Sports", "Business", "Science or Technology"], TC, True),
    ("yahoo", "TC/yahoo", ["Society & Culture", "Science & Mathematics", "Health",
                           "Education & Reference", "Computers & Internet", "Sports",
                           "Business & Finance", "Entertainment & Music",
                           "Family & Relationships", "Politics & Government"], TC, True),
    ("multirc", "MultiRC/MultiRC", ["False", "True"], MULTIRC, True),
    ("boolq", "BoolQA/BoolQA", ["True", "False"], BOOLQA, True),
    ("wic", "WiC/WiC", ["True", "False"], WIC, True),
]


@pytest.fixture(scope="module")
def recipe():
    return load_config(RECIPE)


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))


@pytest.fixture(scope="module")
def bos_tok(gpt2_tokenizer_dir):
    """The GPT-2 tokenizer made to add a BOS (its <|endoftext|>) like Llama's."""
    from tokenizers import processors
    from transformers import GPT2TokenizerFast

    t = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", t.eos_token_id)])
    assert t("a b")["input_ids"][0] == t.eos_token_id
    return t


# ----------------------------------------------------------------------------- the recipe


def test_recipe_tasks_follow_olora_cl_benchmark(recipe):
    assert [t.name for t in recipe.tasks] == [row[0] for row in OLORA_LONG15]
    for task, (name, folder, labels, instruction, option_line) in zip(recipe.tasks, OLORA_LONG15):
        assert task.train == f"data/CL_Benchmark/{folder}/train.json", name
        assert task.test == f"data/CL_Benchmark/{folder}/test.json", name
        assert task.labels == labels, name  # the order too: it is the prompt's Option line
        assert task.instruction == instruction, name
        assert task.option_line is option_line, name
        assert task.test_only_labels == (["-"] if name == "mnli" else []), name
        assert (task.text_field, task.label_field) == ("sentence", "label"), name


def test_recipe_prompts(recipe):
    tasks = {t.name: t for t in recipe.tasks}

    def prompt(name):
        t = tasks[name]
        return build_prompt(t.instruction, t.labels, "S", t.option_line)

    assert prompt("copa") == "S\nAnswer:"  # O-LoRA: "{0}\nAnswer:", the sentence names A and B
    assert prompt("rte") == f"{NLI}\nOption: contradiction, entailment\nS\nAnswer:"
    assert prompt("boolq") == f"{BOOLQA}\nOption: True, False\nS\nAnswer:"


def test_recipe_uses_reference_truncation_and_generation(recipe):
    t, e = recipe.train, recipe.eval
    assert (t.max_source_len, t.truncate_source, t.max_target_len) == (512, "head", 50)
    assert (e.mode, e.max_new_tokens) == ("generate", 50)


def test_demo_default_truncation_is_tail():
    assert load_config(REPO / "configs" / "demo.yaml").train.truncate_source == "tail"


# ----------------------------------------------------------------------------- truncation


def test_head_and_tail_truncation_gpt2(tok):
    text = " ".join(f"w{i}" for i in range(300))
    prompt = build_prompt("Pick one.", ["yes", "no"], text)
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(plain) > 40
    assert encode_source(tok, prompt, 40, "head") == plain[:40]
    assert encode_source(tok, prompt, 40, "tail") == plain[-40:]
    assert encode_source(tok, prompt, 40) == plain[-40:]  # the default is tail
    short = build_prompt("Pick one.", ["yes", "no"], "w1 w2")
    assert encode_source(tok, short, 40, "head") == encode_source(tok, short, 40, "tail") == \
        tok(short)["input_ids"]
    with pytest.raises(ValueError, match="truncate must be one of head, tail"):
        encode_source(tok, prompt, 40, "middle")


def test_head_truncation_is_the_reference_bos_plus_first_tokens(bos_tok):
    """Reference: [BOS] + prompt_ids[:max_source_len - 1]; target = label + eos after it."""
    tok = bos_tok
    text = " ".join(f"w{i}" for i in range(300))
    prompt = build_prompt(SC, SENTIMENT5, text)
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    enc = encode_example(tok, SC, SENTIMENT5, text, "neutral", 32, 8, truncate_source="head")
    n_src = sum(1 for t in enc.labels if t == IGNORE)
    assert n_src == 32
    assert enc.input_ids[:n_src] == [tok.eos_token_id] + plain[:31]
    assert tok.decode(enc.input_ids[1:n_src]).startswith(SC + "\nOption: very negative")
    assert "Answer:" not in tok.decode(enc.input_ids[:n_src])  # the end of a long prompt is cut
    target = tok("neutral", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[n_src:] == enc.labels[n_src:] == target
    tail = encode_example(tok, SC, SENTIMENT5, text, "neutral", 32, 8, truncate_source="tail")
    assert tail.input_ids[:32] == [tok.eos_token_id] + plain[-31:]
    assert tok.decode(tail.input_ids[:32]).endswith("\nAnswer:")


def test_evaluation_cuts_the_source_like_training(tok):
    """Rank mode sees exactly the training source for either truncate_source."""
    import torch

    task = TaskConfig(name="t", train="", instruction="Pick one.", labels=["yes", "no"])
    text = " ".join(f"w{i}" for i in range(300))
    seen = []

    def forward(ids, mask):
        seen.append(ids[0].tolist())
        return torch.zeros(ids.shape[0], ids.shape[1], len(tok))

    for mode in ("head", "tail"):
        seen.clear()
        S.score_task(forward, tok, [Example(text, "yes")], task, batch_size=1,
                     max_source_len=24, truncate_source=mode)
        want = encode_example(tok, task.instruction, task.labels, text, "yes", 24, 8,
                              truncate_source=mode)
        # the row is the training row without its last token (whose logits are never read)
        assert seen[0] == want.input_ids[:-1], mode


# ----------------------------------------------------------------------------- config errors


def test_bad_truncate_source_is_one_clear_error(tmp_path):
    text = RECIPE.read_text().replace("truncate_source: head", "truncate_source: haed")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1)
                if s.strip().startswith("truncate_source:"))
    with pytest.raises(InputError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"{path}:{line}: train.truncate_source: unknown value 'haed' "
                   "(did you mean 'head'?); one of head, tail")
    with pytest.raises(InputError, match=r"<command line>: train.truncate_source: unknown value "
                                         r"'middle'; one of head, tail"):
        load_config(RECIPE, ["train.truncate_source=middle"])


def test_test_only_labels(tmp_path, recipe):
    path = tmp_path / "mnli.json"
    path.write_text('[{"sentence": "a", "label": "neutral"}, {"sentence": "b", "label": "-"}]')
    task = TaskConfig(name="mnli", train=str(path), test=str(path),
                      labels=["neutral", "entailment", "contradiction"], test_only_labels=["-"])
    assert [e.label for e in load_examples(task, "test")] == ["neutral", "-"]
    assert [e.label for e in S.load_task_examples(str(path), task)] == ["neutral", "-"]
    with pytest.raises(InputError, match=r"mnli.json:1: label: label '-' is not one of"):
        load_examples(task, "train")  # never a training label
    with pytest.raises(InputError, match=r"tasks.2.test_only_labels: 'neutral' is already in"):
        load_config(RECIPE, ["tasks.2.test_only_labels=[neutral]"])


# ----------------------------------------------------------------------------- exact match


def test_exact_match_reads_answers_like_olora(tok):
    src = tok("Pick.\nOption: yes, no\nsome text\nAnswer:")["input_ids"]

    def answer(generated, source=src):
        return S.extract_answer(tok, source, tok(generated, add_special_tokens=False)["input_ids"])

    assert answer(" yes") == "yes"
    assert answer(" no\nAnswer: yes") == "yes"  # the text after the LAST "Answer:"
    cut = tok("Pick.\nOption: yes, no\nsome text")["input_ids"]  # head-cut: no "Answer:"
    assert answer(" yes", cut) == ""
    # O-LoRA's normalisation: lower-case, ASCII punctuation out, whitespace collapsed
    assert S.normalize_answer("  Very   Positive!\n") == "very positive"
    assert S.normalize_answer("Not_Entailment.") == "notentailment"
    assert S.normalize_answer("«Oui»") == "«oui»"  # non-ASCII punctuation stays, as in O-LoRA
