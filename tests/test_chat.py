"""The chat format and conversations as data: ids against transformers' apply_chat_template and llama.cpp, the
training mask, reading JSONL and Hugging Face datasets, bad input with its line, over-long conversations, batches."""

import json

import datasets
import numpy as np
import pytest
import torch

from builders import write_checkpoint
from data import DataConfig, DataError, prepare
from data.chat import CHAT_TEMPLATE, IM_END, add_chat_tokens, end_of_turn_id, prompt_ids, render_conversation
from data.conversations import ConversationBatches, Conversations
from data.tokenizer import load_tokenizer
from export import main as export_main
from scripts.chat_skill import conversations

CONVERSATIONS = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Say hello in Japanese, 東京 style 🚀"}, {"role": "assistant", "content": "こんにちは!"},
     {"role": "user", "content": "And in French?\nTwo lines."}, {"role": "assistant", "content": "Bonjour, café.\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  two leading spaces\tand a tab"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "  spaced"}],
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("chat") / "run", chat=True)


@pytest.fixture(scope="module")
def tok(chat_run):
    """The checkpoint's tokenizer as training uses it: special-token text in a message is text."""
    t = load_tokenizer(str(chat_run / "tokenizer.json"))
    t.encode_special_tokens = True
    return t


@pytest.fixture(scope="module")
def prompt_tok(chat_run):
    """The checkpoint's tokenizer as inference loads it: special-token text is the special token."""
    return load_tokenizer(str(chat_run / "tokenizer.json"))


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def chat_cfg(tmp_path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 300)
    return DataConfig(source="chat", cache_dir=str(tmp_path / "cache"), **kw)


# ----------------------------------------------------------------------------- the format

def test_ids_equal_transformers_apply_chat_template(chat_run, tok, prompt_tok, tmp_path):
    """The exported folder's tokenizer renders the template we saved: its ids are our training ids, and with the
    generation prompt our inference prompt (data.chat.prompt_ids) and the start of the answered conversation."""
    import transformers

    assert export_main(["--ckpt", str(chat_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        ids, _ = render_conversation(messages, tok)
        assert list(hf.apply_chat_template(messages, tokenize=True, return_dict=False)) == ids
        history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        theirs = list(hf.apply_chat_template(history, tokenize=True, add_generation_prompt=True, return_dict=False))
        assert theirs == prompt_ids(history, CHAT_TEMPLATE, prompt_tok)
        if history is not messages:
            assert ids[:len(theirs)] == theirs
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == [tok.token_to_id("<|endoftext|>"), tok.token_to_id(IM_END)]


def test_gguf_carries_the_template_and_llama_cpp_tokenizes_it_as_we_do(chat_run, tok, prompt_tok, tmp_path):
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from checkpoint.gguf import load_in_llama_cpp

    out = tmp_path / "chat.gguf"
    assert export_main(["--ckpt", str(chat_run), "--format", "gguf", "--out", str(out)]) == 0
    fields = gguf.GGUFReader(out).fields
    text = lambda f: bytes(f.parts[f.data[0]]).decode()  # noqa: E731
    assert text(fields["tokenizer.chat_template"]) == CHAT_TEMPLATE
    assert int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0]) == tok.token_to_id(IM_END)
    llama = load_in_llama_cpp(out, n_ctx=256)
    render = Jinja2ChatFormatter(llama.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    for messages in CONVERSATIONS:
        prompt = render(messages=messages[:-1] or messages).prompt
        theirs = llama.tokenize(prompt.encode(), add_bos=False, special=True)
        assert theirs == prompt_ids(messages[:-1] or messages, CHAT_TEMPLATE, prompt_tok)


def test_the_mask_spells_the_replies(tok):
    """The target tokens, decoded run by run, are each assistant reply followed by <|im_end|>: nothing of the
    system or user turns, nothing of the headers. (A vocabulary that merged "\\n " into one token would make a reply
    that starts with spaces begin with the header's newline, as "\\n " is one pre-token; the tiny one does not.)"""
    for messages in CONVERSATIONS:
        ids, mask = render_conversation(messages, tok)
        assert len(ids) == len(mask)
        runs, current = [], []
        for i, m in zip(ids, mask):
            if m:
                current.append(i)
            elif current:
                runs.append(tok.decode(current, skip_special_tokens=False))
                current = []
        replies = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
        assert runs == replies
        assert tok.decode(ids, skip_special_tokens=False) == \
            "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_a_literal_turn_token_in_a_message_stays_text(tok):
    ids, mask = render_conversation([{"role": "user", "content": "fake <|im_end|> end"},
                                     {"role": "assistant", "content": "ok"}], tok)
    assert ids.count(tok.token_to_id(IM_END)) == 2  # the two real ends, not the one in the text


def test_chat_tokens_are_added_once_at_the_end():
    from builders import train_tiny_tokenizer

    t = train_tiny_tokenizer()
    n = t.get_vocab_size(with_added_tokens=True)
    assert end_of_turn_id(t) is None
    assert add_chat_tokens(t) == ["<|im_start|>", IM_END] and add_chat_tokens(t) == []
    assert (t.token_to_id("<|im_start|>"), end_of_turn_id(t)) == (n, n + 1)


# ----------------------------------------------------------------------------- reading conversations

def test_jsonl_and_hf_dataset_give_the_same_data(tmp_path):
    convs = conversations(40, seed=3)
    a = prepare(chat_cfg(tmp_path, path=write_jsonl(tmp_path / "c.jsonl", convs), val_fraction=0.1))
    datasets.Dataset.from_dict({"messages": [c["messages"] for c in convs]}).save_to_disk(str(tmp_path / "ds"))
    b = prepare(chat_cfg(tmp_path, name=str(tmp_path / "ds"), val_fraction=0.1))
    assert a.dir != b.dir and a.meta["n_train_conversations"] == 36 and a.meta["n_val_conversations"] == 4
    for split in ("train", "val"):
        for field in ("ids", "mask", "starts"):
            assert np.array_equal(getattr(getattr(a, split), field), getattr(getattr(b, split), field))
    assert (a.dir / "tokenizer_config.json").is_file()
    assert json.loads((a.dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_the_files_hold_each_conversation_rendered(tmp_path):
    """The cache reopens (load_prepared) as the conversations rendered one after another, masks included."""
    from data import load_prepared

    convs = conversations(10, seed=4)
    d = load_prepared(prepare(chat_cfg(tmp_path, path=write_jsonl(tmp_path / "c.jsonl", convs),
                                       val_path=write_jsonl(tmp_path / "v.jsonl", convs[:2]))).dir)
    tok = d.tokenizer
    tok.encode_special_tokens = True
    for split, expected in ((d.train, convs), (d.val, convs[:2])):
        rendered = [render_conversation(c["messages"], tok) for c in expected]
        assert np.array_equal(split.ids, np.concatenate([ids for ids, _ in rendered]))
        assert np.array_equal(split.mask, np.concatenate([m for _, m in rendered]).astype(np.uint8))
        assert split.starts.tolist() == np.cumsum([0] + [len(ids) for ids, _ in rendered]).tolist()


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"c\.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     r"c\.jsonl:2: message 0 has the unknown role 'tool'; use system, user or assistant"),
    ('{"text": "hi"}', r"c\.jsonl:2: expected an object with \"messages\""),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"c\.jsonl:2: the conversation has no "
                                                                       "assistant message"),
    ('{"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "y"}]}',
     r"c\.jsonl:2: message 0 has content of type list; it must be a string"),
    ('{"messages": []}', r"c\.jsonl:2: \"messages\" must be a non-empty list"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    good = conversations(3, seed=0)
    path = write_jsonl(tmp_path / "c.jsonl", [good[0], line, good[1]])
    with pytest.raises(DataError, match=message):
        prepare(chat_cfg(tmp_path, path=path))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_chat_options(tmp_path):
    with pytest.raises(DataError, match="data=chat needs one source of conversations"):
        prepare(chat_cfg(tmp_path))
    (tmp_path / "notes.txt").write_text("hi\n")
    with pytest.raises(DataError, match="data=chat reads .jsonl files"):
        prepare(chat_cfg(tmp_path, path=str(tmp_path / "notes.txt")))


# ----------------------------------------------------------------------------- rows and batches

def split_of(convs: list[list[int]], masks: list[list[int]]) -> Conversations:
    starts = np.cumsum([0] + [len(c) for c in convs])
    return Conversations(np.concatenate(convs), np.concatenate(masks).astype(np.uint8), starts, pad_id=0)


def test_rows_cut_long_conversations_and_leave_out_those_without_a_reply():
    """Hand-made conversations (ids 10.., mask 1 on the reply) against rows written out by hand."""
    split = split_of([[10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34, 35]],
                     [[0, 0, 1, 1], [0, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    assert split.trainable(seq_len=4).tolist() == [0, 1]  # conversation 2's reply is past its first 5 tokens
    x, y = split.rows(np.array([0, 1]), seq_len=4)
    assert x.tolist() == [[10, 11, 12, 0], [20, 21, 22, 23]]
    assert y.tolist() == [[-1, 12, 13, -1], [-1, 22, -1, 24]]  # conversation 1 is cut after 5 tokens
    assert split.trainable(seq_len=8).tolist() == [0, 1, 2]


def test_batches_visit_every_conversation_once_per_epoch_and_split_by_rank():
    convs = [[100 + c] * (2 + c % 5) for c in range(10)]
    split = split_of(convs, [[0] + [1] * (len(c) - 1) for c in convs])
    b = ConversationBatches(split, seq_len=16, batch_size=4, seed=7)
    firsts = [int(x[r, 0]) for step in range(5) for x in [b.get_batch(step)[0]] for r in range(4)]
    assert sorted(firsts[:10]) == sorted(firsts[10:20]) == list(range(100, 110))  # two epochs
    assert firsts[:10] != firsts[10:20]  # a new order each epoch
    again = ConversationBatches(split, seq_len=16, batch_size=4, seed=7)
    for step in (3, 0, 4):  # a pure function of the step: any order, a new object
        assert all(torch.equal(p, q) for p, q in zip(again.get_batch(step), b.get_batch(step)))
    shares = [ConversationBatches(split, 16, 4, 7, rank=r, world_size=2).get_batch(3) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shares]), b.get_batch(3)[0])
    assert torch.equal(torch.cat([s[1] for s in shares]), b.get_batch(3)[1])


def test_no_reply_in_the_window_is_refused(tmp_path):
    split = split_of([[1, 2, 3, 4, 5]], [[0, 0, 0, 1, 1]])
    with pytest.raises(DataError, match="no training conversation has a reply token within its first "
                                        r"train.seq_len\+1=3 tokens; raise train.seq_len"):
        ConversationBatches(split, seq_len=2, batch_size=1, seed=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["paged", "recompute"])
def test_generation_stops_at_a_stop_token_and_keeps_it(use_cache):
    """SamplingParams.stop_token_ids (how a reply ends at <|im_end|>): the output is the free-running greedy
    output up to and including the first stop token, finish_reason "stop"."""
    from builders import tiny_model
    from engine import LLM, SamplingParams

    llm = LLM(model=tiny_model(seed=0), device="cpu", use_cache=use_cache)
    prompt = [[5, 17, 42, 99]]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))[0].token_ids
    stop = free[6]
    first = free.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True,
                                              stop_token_ids=[stop]))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    with pytest.raises(ValueError, match="stop_token_ids must be integers"):
        SamplingParams(stop_token_ids=["<|im_end|>"])


def test_long_conversations_are_counted_at_the_start(tmp_path, capsys):
    short = [{"messages": [{"role": "system", "content": "You add numbers."},
                           {"role": "user", "content": f"Add {i} and 1."},
                           {"role": "assistant", "content": str(i + 1)}]} for i in range(12)]
    long_reply = {"messages": short[0]["messages"][:2] + [{"role": "assistant", "content": "many words " * 40}]}
    long_prompt = {"messages": [{"role": "system", "content": "a long table " * 40}] + short[1]["messages"][1:]}
    d = prepare(chat_cfg(tmp_path, path=write_jsonl(tmp_path / "c.jsonl", short + [long_reply, long_prompt]),
                         val_path=write_jsonl(tmp_path / "v.jsonl", short[:2])))
    capsys.readouterr()
    batches = d.train_batches(seq_len=96, batch_size=2, seed=0)
    assert capsys.readouterr().out == ("data: 2 of 14 training conversations are longer than train.seq_len+1=97 "
                                       "tokens and are cut there; 1 have no reply token before the cut and are left "
                                       "out\n")
    assert len(batches.keep) == 13 and 13 not in batches.keep  # the long prompt goes, the long reply is cut


def test_the_skill_set_is_seeded_each_answer_is_the_sum_and_the_scored_sums_are_unseen(tmp_path):
    import re

    from scripts.chat_skill import write_data

    train_file, test_file = write_data(tmp_path / "a", 300, 50, seed=4)
    again, _ = write_data(tmp_path / "b", 300, 50, seed=4)
    assert train_file.read_bytes() == again.read_bytes()
    train = [json.loads(line) for line in train_file.read_text().splitlines()]
    test = [json.loads(line) for line in test_file.read_text().splitlines()]
    assert len(train) == 300 and len(test) == 50
    asked_in_training = set()
    for c in train + test:
        turns = [m for m in c["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and 2 <= len(turns) <= 6
        for question, reply in zip(turns[::2], turns[1::2]):
            a, b = (int(n) for n in re.findall(r"\d+", question["content"]))
            assert 0 <= a <= 99 and 0 <= b <= 99 and reply["content"] == str(a + b)
            if c in train:
                asked_in_training.add((a, b))
    for c in test:  # the scored question, the last, asks a sum no training conversation asks
        last = [int(n) for n in re.findall(r"\d+", c["messages"][-2]["content"])]
        assert tuple(last) not in asked_in_training