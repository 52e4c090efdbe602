"""The study's data, one split for every experiment (study/plan.md, "Data"): the bundled corpus in documents, 2% held
out and decontaminated (no validation line shares a 50-character string with the training text), the Wikipedia
sample decontaminated the same way, and the retrieval mix whose training documents never hold a held-out key or a
held-out filler sentence.
"""

import json
import random
from pathlib import Path

import numpy as np

from lit_gpt.data.prepare import BUNDLED_CORPUS, BUNDLED_WIKI, META_FILENAME, read_text, split_documents, write_prepared
from study.tasks import training_documents

SHARED_CHARS = 50  # validation text may not share a string this long with training text


def corpus_split(val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training documents, validation documents) of the bundled corpus, the documents shuffled with `seed`."""
    documents = [d for path in BUNDLED_CORPUS for d in split_documents(read_text(path))]
    random.Random(seed).shuffle(documents)
    n_val = max(1, round(len(documents) * val_fraction))
    return documents[n_val:], documents[:n_val]


def window_hashes(text: str, n: int = SHARED_CHARS) -> np.ndarray:
    """A 64-bit polynomial hash of every n-character window of `text` (uint64, wrapping), one per start."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if codes.size < n:
        return np.empty(0, dtype=np.uint64)
    hashes = np.zeros(codes.size - n + 1, dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for j in range(n):
            hashes = hashes * base + codes[j : codes.size - n + 1 + j]
    return hashes


def training_windows(training: list[str]) -> np.ndarray:
    """The sorted window hashes of every training document (windows never span two documents)."""
    return np.sort(np.concatenate([window_hashes(t) for t in training]), kind="stable")


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """Documents as one token array, EOS after each (as the prepared files hold them)."""
    ids = [np.append(tokenizer.encode(d, bos=False).numpy(), tokenizer.eos_id) for d in documents]
    return np.concatenate(ids).astype(np.int64)


def decontaminate(documents: list[str], seen: np.ndarray) -> tuple[list[str], int]:
    """`documents` without every line that holds or touches a window of SHARED_CHARS characters found in the training
    text (a window that spans lines drops each line it touches); repeated until none is left. Returns the documents
    (empty ones dropped) and the number of lines dropped. A hash match drops a line even in the unlikely case of a
    collision: the check can only err on the side of dropping."""
    def found(hashes: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(seen, hashes), seen.size - 1)
        return np.flatnonzero(seen[at] == hashes)

    dropped, out = 0, []
    for document in documents:
        lines = document.splitlines(keepends=True)
        while True:
            text = "".join(lines)
            hits = found(window_hashes(text))
            if hits.size == 0:
                break
            ends = np.cumsum([len(line) for line in lines])
            starts = ends - np.array([len(line) for line in lines])
            bad = set()
            for i in hits:
                bad.update(np.flatnonzero((starts < i + SHARED_CHARS) & (ends > i)).tolist())
            dropped += len(bad)
            lines = [line for k, line in enumerate(lines) if k not in bad]
        if "".join(lines).strip():
            out.append("".join(lines))
    return out, dropped


def study_texts(settings: dict) -> dict:
    """Every text of the study, by experiment: {"corpus": (train, val), "wiki": val, "mix": (train, val)}, lists of
    documents, with the counts of what decontamination dropped."""
    train, val = corpus_split(settings["val_fraction"], settings["split_seed"])
    if settings.get("max_train_documents"):  # the quick grid's smoke test: a slice of the corpus
        train, val = train[: settings["max_train_documents"]], val[: max(2, settings["max_train_documents"] // 50)]
    seen = training_windows(train)
    val, dropped = decontaminate(val, seen)
    wiki, wiki_dropped = decontaminate(split_documents(read_text(BUNDLED_WIKI)), seen)
    return dict(corpus=(train, val), wiki=wiki, dropped_lines=dict(corpus_val=dropped, wiki=wiki_dropped))


def mix_texts(tokenizer, settings: dict, corpus: tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    """The retrieval mix: (training documents, validation documents). Training: retrieval documents with training
    keys and filler, and corpus training documents cut to about 1,000 characters (`corpus_share` of the mix).
    Validation: the same from held-out keys, held-out filler and the corpus validation documents."""
    def mix(documents: list[str], corpus_docs: list[str], seed: int) -> list[str]:
        pieces = [p for d in corpus_docs for p in split_documents(d, size=1000)]
        count = min(len(pieces), round(len(documents) * settings["corpus_share"] / (1 - settings["corpus_share"])))
        rng = random.Random(seed)
        mixed = documents + rng.sample(pieces, count)
        rng.shuffle(mixed)
        return mixed

    block = settings["block_size"]
    train = training_documents(tokenizer, settings["documents"], block, seed=0)
    val = training_documents(tokenizer, settings["val_documents"], block, seed=1, held_out=True)
    return mix(train, corpus[0], 2), mix(val, corpus[1], 3)


def prepare_folder(folder: Path, train: list[str], val: list[str], about: dict, tokenizer_dir: Path | None = None,
                   train_tokenizer: int | None = None) -> Path:
    """Tokenize a split into `folder` (reused when its meta.json says it holds the same `about`)."""
    import datasets

    meta = folder / META_FILENAME
    if meta.is_file() and json.loads(meta.read_text()).get("study") == about:
        return folder
    rows = [datasets.Dataset.from_dict({"text": texts}) for texts in (train, val)]
    return write_prepared(*rows, folder, tokenizer_dir, train_tokenizer, None, True, dict(study=about))
