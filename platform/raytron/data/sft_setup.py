"""What SFT encoding takes besides the tokenizer: the chat template and the special tokens it sees.

The template is ``data.chat_template`` when set, either inline Jinja (any text with ``{{`` or ``{%``)
or the path / URL of a file holding it; else the given tokenizer's own (``chat_template.jinja`` beside
it, else its ``tokenizer_config.json``'s ``chat_template``, as transformers loads them); else
``data.format: chat`` fails naming data.chat_template. Special tokens (bos_token, eos_token, pad_token,
...) come from the tokenizer_config.json, else raytron's own (``<|endoftext|>``, ``<|bos|>``,
``<|pad|>``) that the vocabulary has. The template text, where it came from and the tokenizer files'
hash go into the fingerprint, so a changed template prepares again.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from raytron.config import ConfigError
from raytron.data.chat_template import ChatTemplate, ChatTemplateError, special_tokens_of
from raytron.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN
from raytron.data.tokenizer_source import CHAT_TEMPLATE_FILE, TokenizerConfig, TokenizerSpec
from raytron.data_config import DataConfig
from raytron.storage import StorageError, join_url, read_bytes

JINJA_MARKERS = ("{{", "{%")
RAYTRON_SPECIAL_TOKENS = {"eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "pad_token": PAD_TOKEN}


@dataclass(frozen=True)
class SftSetup:
    template: str | None
    """Jinja text (data.format chat only)."""
    template_source: str | None
    """'data.chat_template' (inline), or the URL of the file it was read from."""
    special_tokens: dict[str, str]
    tokenizer_config_sha256: str | None

    def settings(self, data: DataConfig) -> dict:
        """The manifest's settings['sft'] (hashed into the fingerprint)."""
        return {"format": data.format, "train_on_prompt": data.train_on_prompt, "too_long": data.too_long,
                "packing": data.packing, "chat_template": self.template,
                "chat_template_source": self.template_source,
                "tokenizer_config_sha256": self.tokenizer_config_sha256}


def sft_setup(data: DataConfig, tokenizer: TokenizerSpec | None) -> SftSetup:
    """``tokenizer`` is the given one, None for one trained on the corpus (which has raytron's tokens)."""
    config = tokenizer.config if tokenizer else None
    if config and config.content:
        special = special_tokens_of(config.content)
    else:
        vocab = Tokenizer.from_str(tokenizer.json).get_vocab() if tokenizer else None
        special = {key: text for key, text in RAYTRON_SPECIAL_TOKENS.items() if vocab is None or text in vocab}
    template, source = _template(data, config) if data.format == "chat" else (None, None)
    if template is not None:
        try:
            ChatTemplate(template, special)
        except ChatTemplateError as error:
            raise ConfigError(f"data.chat_template ({source}): {error}") from None
    return SftSetup(template, source, special, config.sha256 if config else None)


def _template(data: DataConfig, config: TokenizerConfig | None) -> tuple[str, str]:
    given = data.chat_template
    if given is not None:
        if any(marker in given for marker in JINJA_MARKERS):
            return given, "data.chat_template"
        try:
            return read_bytes(given, data.endpoint_url, data.region).decode("utf-8"), given
        except (StorageError, UnicodeDecodeError) as error:
            raise ConfigError(f"data.chat_template: {given!r} is neither inline Jinja (no {{{{ or {{%) nor a "
                              f"readable template file ({error})") from None
    if config and config.template_text:
        return config.template_text, join_url(config.folder, CHAT_TEMPLATE_FILE)
    if config and config.content.get("chat_template"):
        where = join_url(config.folder, "tokenizer_config.json")
        try:
            return ChatTemplate.from_tokenizer_config(config.content, where).source, where
        except ChatTemplateError as error:
            raise ConfigError(f"data.tokenizer: {error}") from None
    raise ConfigError("data.format chat needs a chat template: set data.chat_template (inline Jinja or a file), "
                      "or data.tokenizer to a tokenizer folder whose tokenizer_config.json has a chat_template "
                      f"(or with a {CHAT_TEMPLATE_FILE})")
