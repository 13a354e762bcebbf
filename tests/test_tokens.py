"""Chat encoding and EOS ids have one owner (rad.models.tokens): every caller gets the same ids, template or not."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from rad.decoding.generate import encode_prompt
from rad.distill.data import DataConfig, render
from rad.evaluate import generation
from rad.models.tokens import encode_chat, eos_token_ids, padding_token_id, render_chat, token_ids
from rad.search.prompts import encode_prompts

TEMPLATE = ("{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}")
CORPUS = ["Name three colours.", "Red, green and blue.", "What is a river?", "A river is flowing water.",
          "Say hello in German.", "Hallo!"] * 4


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A tiny byte-level BPE tokenizer that adds BOS like a Llama one, without a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|turn|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert not fast.chat_template and fast.eos_token_id == 2 and fast.bos_token_id == 1
    return fast


@pytest.fixture(scope="module")
def chat_tokenizer(plain_tokenizer):
    tok = copy.deepcopy(plain_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


PAIR = [{"role": "user", "content": "What is a river?"}, {"role": "assistant", "content": "Flowing water."}]


def test_with_a_template_the_ids_are_the_templates_text_without_added_specials(chat_tokenizer):
    text = chat_tokenizer.apply_chat_template(PAIR[:1], tokenize=False, add_generation_prompt=True)
    assert render_chat(chat_tokenizer, PAIR[:1], True) == text
    ids = encode_chat(chat_tokenizer, PAIR[:1], True)
    assert ids == chat_tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == chat_tokenizer.convert_tokens_to_ids("<|turn|>")  # no BOS added on top of the template
    full = encode_chat(chat_tokenizer, PAIR, False)
    assert full[: len(ids)] == ids


def test_without_a_template_the_fallback_is_newline_joined_text_with_bos_and_a_closing_eos(plain_tokenizer,
                                                                                          caplog):
    tok = copy.deepcopy(plain_tokenizer)  # a tokenizer not warned about yet
    with caplog.at_level(logging.WARNING, logger="rad.models.tokens"):
        assert render_chat(tok, PAIR[:1], True) == "What is a river?\n"
        prompt = encode_chat(tok, PAIR[:1], True)
        full = encode_chat(tok, PAIR, False)
    assert prompt == tok("What is a river?\n").input_ids and prompt[0] == tok.bos_token_id
    assert full == tok("What is a river?\nFlowing water.").input_ids + [tok.eos_token_id]
    assert full[: len(prompt)] == prompt  # the prompt is a prefix: mask_prompt can drop it
    assert tok.decode(full[len(prompt):], skip_special_tokens=True) == "Flowing water."
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1  # once per tokenizer, not once per record


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_every_caller_encodes_one_user_turn_the_same_way(kind, plain_tokenizer, chat_tokenizer, monkeypatch):
    """rad generate --chat, the search prompts, rad eval and the distillation data: the same ids, template or not
    (before, without a template generate and eval raised, the search used the bare prompt with no newline,
    and only distillation used this fallback)."""
    tok = plain_tokenizer if kind == "plain" else chat_tokenizer
    prompt = "Name three colours."
    expected = encode_chat(tok, [{"role": "user", "content": prompt}], True)

    assert encode_prompt(tok, prompt, chat=True)[0].tolist() == expected
    assert encode_prompts(tok, [prompt], chat=True)[0][0].tolist() == expected

    seen = []
    monkeypatch.setattr(generation, "greedy_generate",
                        lambda model, ids, n, **kw: seen.append(ids[0].tolist()) or _Empty())
    generator = generation.Generator(None, tok, generation.GenerationConfig(chat=True))
    generator.generate([generation.render_prompt(tok, [{"role": "user", "content": prompt}], prompt, True)])
    assert seen == [expected]

    (ids, mask), = render([{"prompt": prompt, "response": "Red."}], tok, DataConfig(mask_prompt=True))
    assert ids[: len(expected)] == expected and mask == [0] * len(expected) + [1] * (len(ids) - len(expected))
    assert tok.eos_token_id in ids[len(expected):]  # the assistant turn is closed (template's </s>, or fallback)


class _Empty:
    tokens = torch.empty(0, dtype=torch.long)


def test_eos_ids_are_the_tokenizers_then_the_generation_configs_deduplicated(plain_tokenizer):
    class Model:
        generation_config = GenerationConfig(eos_token_id=[7, 2, 7])

    assert eos_token_ids(plain_tokenizer) == [2]
    assert eos_token_ids(plain_tokenizer, Model()) == [2, 7]
    assert eos_token_ids(None, Model()) == [7, 2]  # a bare model: its generation config alone
    Model.generation_config = GenerationConfig(eos_token_id=5)
    assert eos_token_ids(plain_tokenizer, Model()) == [2, 5]
    assert token_ids(None) == [] and token_ids(3) == [3] and token_ids((4, 4, 1)) == [4, 1]


def test_padding_is_the_pad_token_else_the_first_eos_else_zero(plain_tokenizer):
    """One rule pads evaluation batches, the search's reference generations and the distillation sequences."""
    class Model:
        generation_config = GenerationConfig(eos_token_id=[7, 2])

    tok = copy.deepcopy(plain_tokenizer)
    tok.pad_token = None
    assert padding_token_id(tok) == 2  # no pad token: the tokenizer's EOS
    assert padding_token_id(None, Model()) == 7  # a bare model: its generation config's first EOS
    assert padding_token_id(None) == 0
    tok.pad_token = tok.convert_ids_to_tokens(3)
    assert padding_token_id(tok, Model()) == 3
