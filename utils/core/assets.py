"""The registry of every file the course downloads (hand-written; no notebook builds it).

Each asset is declared once here, with its canonical URL, a backup URL where one exists,
its size in bytes and its sha256. `utils.core.download.fetch(name)` is the one way to get it.
`data/README.md` lists the same table for people; `tests/test_download.py` checks the two agree.

Sizes and checksums come from the published files (the Hugging Face Hub's LFS metadata for
the GPT-2 weights, the UCI archive for the SMS data, tiktoken's pinned hashes for the BPE files).
Chapter 9's open models are pinned to one Hub revision each: the canonical address follows
`main`, the backup address that revision, so a later change on `main` cannot slip in unverified.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.core.messages import unknown_name

__all__ = ["Asset", "ASSETS", "get_asset", "UnknownAssetError"]


@dataclass(frozen=True)
class Asset:
    """One downloadable file: where it lives online and how to recognise a good copy."""

    name: str  # registry key, e.g. "the-verdict"
    filename: str  # path inside the data folder (and inside an offline mirror)
    url: str  # canonical address
    size: int | None  # bytes of the file we keep (None: not published; sha256 still checked)
    sha256: str  # hex digest of the file we keep
    backup_url: str | None = None  # tried when the canonical address fails
    archive_member: str | None = None  # the URL is a zip: keep only this member
    description: str = ""
    token_env: str | None = None  # a gated file: send this variable's token (e.g. HF_TOKEN)

    @property
    def urls(self) -> list[str]:
        return [u for u in (self.url, self.backup_url) if u]


_HF = "https://huggingface.co/openai-community/{repo}/resolve/main/model.safetensors"
_HUB = "https://huggingface.co/{repo}/resolve/{revision}/{file}"
_QWEN3 = ("Qwen/Qwen3-0.6B", "c1899de289a04d12100db370d81485cdf75e47ca")  # (repo, revision)
_LLAMA32 = ("meta-llama/Llama-3.2-1B", "4e20de362430cd3b72f300e6b0f18e50e7166e08")


def _hub(name: str, model: tuple[str, str], file: str, size: int, sha256: str,
         description: str, token_env: str | None = None) -> Asset:
    """A file of a Hub model repository: `main` first, then the pinned revision."""
    (repo, revision), folder = model, name.rsplit("-", 1)[0]
    return Asset(name, f"{folder}/{file}", _HUB.format(repo=repo, revision="main", file=file),
                 size, sha256, backup_url=_HUB.format(repo=repo, revision=revision, file=file),
                 description=description, token_env=token_env)

_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_TIKTOKEN = "https://openaipublic.blob.core.windows.net/encodings/"
_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"

_ALL = [
    Asset("the-verdict", "the-verdict.txt",
          _RASBT + "ch02/01_main-chapter-code/the-verdict.txt", 20479,
          "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
          description="Edith Wharton, 'The Verdict' (public domain): chapters 2 and 5"),
    Asset("sms-spam-collection", "SMSSpamCollection.tsv",
          "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip", 477907,
          "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
          backup_url="https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
          archive_member="SMSSpamCollection",
          description="UCI SMS Spam Collection (CC BY 4.0), tab-separated: chapter 6"),
    Asset("instruction-data", "instruction-data.json",
          _RASBT + "ch07/01_main-chapter-code/instruction-data.json", 203524,
          "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
          description="1100 Alpaca-style instruction/input/output entries: chapter 7"),
    Asset("instruction-data-with-preference", "instruction-data-with-preference.json",
          _RASBT + "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
          386968, "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
          description="1100 entries with chosen/rejected responses: preference tuning"),
    Asset("gpt2-encoder-json", "gpt2/encoder.json", _BPE + "encoder.json", 1042301,
          "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
          description="GPT-2 BPE vocabulary (tiktoken 'gpt2')"),
    Asset("gpt2-vocab-bpe", "gpt2/vocab.bpe", _BPE + "vocab.bpe", 456318,
          "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
          description="GPT-2 BPE merges (tiktoken 'gpt2')"),
    Asset("cl100k-base", "openai/cl100k_base.tiktoken", _TIKTOKEN + "cl100k_base.tiktoken",
          1681126, "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
          description="GPT-4's BPE merges (tiktoken 'cl100k_base'): notebook 02b"),
    Asset("o200k-base", "openai/o200k_base.tiktoken", _TIKTOKEN + "o200k_base.tiktoken",
          3613922, "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
          description="GPT-4o's BPE merges (tiktoken 'o200k_base'): notebook 02b"),
    Asset("gpt2-small-124M", "gpt2-weights/gpt2-small-124M.safetensors",
          _HF.format(repo="gpt2"), 548105171,
          "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
          description="Pretrained GPT-2 124M weights (Hugging Face safetensors)"),
    Asset("gpt2-medium-355M", "gpt2-weights/gpt2-medium-355M.safetensors",
          _HF.format(repo="gpt2-medium"), 1519984962,
          "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
          description="Pretrained GPT-2 355M weights (Hugging Face safetensors)"),
    Asset("gpt2-large-774M", "gpt2-weights/gpt2-large-774M.safetensors",
          _HF.format(repo="gpt2-large"), None,
          "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
          description="Pretrained GPT-2 774M weights (about 3.25 GB)"),
    Asset("gpt2-xl-1558M", "gpt2-weights/gpt2-xl-1558M.safetensors",
          _HF.format(repo="gpt2-xl"), None,
          "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
          description="Pretrained GPT-2 1558M weights (about 6.43 GB)"),
    _hub("qwen3-0.6b-config", _QWEN3, "config.json", 726,
         "660db3b73d788119c04535e48cf9be5f55bc3100841a718637ae695b442f27dd",
         "Qwen3-0.6B configuration (Hugging Face config.json): chapter 9"),
    _hub("qwen3-0.6b-tokenizer", _QWEN3, "tokenizer.json", 11422654,
         "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
         "Qwen3 tokenizer (Hugging Face tokenizer.json): chapter 9"),
    _hub("qwen3-0.6b-weights", _QWEN3, "model.safetensors", 1503300328,
         "f47f71177f32bcd101b7573ec9171e6a57f4f4d31148d38e382306f42996874b",
         "Qwen3-0.6B weights, bfloat16 safetensors (Apache 2.0): chapter 9"),
    _hub("llama-3.2-1b-config", _LLAMA32, "config.json", 843,
         "bfb5d39c327ee5c3a65e3574596ff30b052a445cfc59a25bdf3b4c0c5a44f4d2",
         "Llama 3.2 1B configuration (gated: needs HF_TOKEN): chapter 9", token_env="HF_TOKEN"),
    _hub("llama-3.2-1b-tokenizer", _LLAMA32, "tokenizer.json", 9085657,
         "79e3e522635f3171300913bb421464a87de6222182a0570b9b2ccba2a964b2b4",
         "Llama 3 tokenizer (gated: needs HF_TOKEN): chapter 9", token_env="HF_TOKEN"),
    _hub("llama-3.2-1b-weights", _LLAMA32, "model.safetensors", 2471645608,
         "68a2e4be76fa709455a60272fba8e512c02d81c46e6c671cc9449e374fd6809a",
         "Llama 3.2 1B weights, bfloat16 safetensors (Llama 3.2 Community License; gated: "
         "needs HF_TOKEN): chapter 9", token_env="HF_TOKEN"),
]

ASSETS: dict[str, Asset] = {a.name: a for a in _ALL}


class UnknownAssetError(ValueError):
    """Raised for a name that is not in the registry."""


def get_asset(name: str) -> Asset:
    """Look up an asset by name, with a did-you-mean hint for typos."""
    if name in ASSETS:
        return ASSETS[name]
    raise UnknownAssetError(unknown_name("asset", name, ASSETS))
