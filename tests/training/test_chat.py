"""Chat templates: rendered as transformers renders them, carried by the tokenizer through a
checkpoint, and bad input refused in one line."""

import pytest
import transformers

from modlm.training.chat import apply_chat_template
from modlm.training.tokenizers import ChatTemplate, HFTokenizer, tokenizer_from_spec

# Reads a special token, raises on a bad role, and uses tojson (which must not escape HTML).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('role ' + m['role']) }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] | tojson }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
CHAT = [{"role": "user", "content": '<b>1 < 2</b> & "ok"'}, {"role": "assistant", "content": "é東"}]


def test_renders_as_transformers_does(bpe_tokenizer_file):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_file), bos_token="<|endoftext|>")
    ours = ChatTemplate(TEMPLATE, {"bos_token": "<|endoftext|>"})
    for gen in (True, False):
        assert ours.render(CHAT, add_generation_prompt=gen) == fast.apply_chat_template(
            CHAT, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen
        )


def test_the_template_travels_in_the_tokenizer_spec_and_leaves_its_name(tmp_path, bpe_tokenizer_file):
    plain = HFTokenizer.from_file(bpe_tokenizer_file)
    tok = HFTokenizer(bpe_tokenizer_file.read_bytes(), chat_template=ChatTemplate(TEMPLATE, {"bos_token": "<s>"}))
    assert tok.name == plain.name  # the template changes no id
    tok.save(tmp_path)
    again = tokenizer_from_spec(tok.spec(), tmp_path)
    assert again.chat_template == tok.chat_template and "chat_template" not in plain.spec()
    assert apply_chat_template(again, CHAT) == tok.chat_template.render(CHAT)


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ("hi", "messages='hi' is invalid"),
        ([], "messages=[] is invalid"),
        ([{"role": "user"}], "message 0 is {'role': 'user'}"),
        ([{"role": "user", "content": 3}], "message 0 is"),
        ([{"role": "tool", "content": "x"}], "the chat template refused the messages: role tool"),
    ],
)
def test_bad_messages_are_one_line(messages, fragment):
    with pytest.raises(ValueError) as e:
        ChatTemplate(TEMPLATE).render(messages)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_templates_are_one_line(bpe_tokenizer_file):
    for template, fragment in [("", "ChatTemplate.template=''"), ("{% for %}", r"does not parse \(line 1")]:
        with pytest.raises(ValueError, match=fragment):
            ChatTemplate(template).render(CHAT)
    with pytest.raises(ValueError, match="ChatTemplate.special_tokens="):
        ChatTemplate(TEMPLATE, {"bos": "<s>"})
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(HFTokenizer.from_file(bpe_tokenizer_file), CHAT)


def test_the_top_level_name_is_the_function():
    import modlm
    from modlm.training import chat

    assert modlm.apply_chat_template is chat.apply_chat_template
