-- 011: retrieval over each tenant's knowledge base: chunks, an indexing job queue, hybrid search.
--
-- Embeddings use pgvector when the server has it (the embedded PostgreSQL 18 does) and a plain
-- real[] otherwise (e.g. a PostgreSQL 15 without the extension): app.to_embedding() and
-- app.cosine_distance() hide the difference, so the application sends the same SQL to both.
-- Search is exact and per tenant (no global approximate index filtered by tenant: it silently
-- returns too few rows for small tenants).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;
    END IF;
END
$$;

DO $do$
DECLARE
    has_vector boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector');
BEGIN
    IF has_vector THEN
        -- Schema-qualified: callers (definer functions) run with an empty search_path.
        EXECUTE $f$CREATE OR REPLACE FUNCTION app.to_embedding(p text) RETURNS public.vector
                   LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT p::public.vector'$f$;
        EXECUTE $f$CREATE OR REPLACE FUNCTION app.cosine_distance(a public.vector, b public.vector)
                   RETURNS double precision
                   LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT a OPERATOR(public.<=>) b'$f$;
    ELSE
        -- Takes pgvector's text form and an array's own (a stored embedding read back as text
        -- and reused): either way a one-dimensional real[].
        EXECUTE $f$CREATE OR REPLACE FUNCTION app.to_embedding(p text) RETURNS real[]
                   LANGUAGE sql IMMUTABLE PARALLEL SAFE
                   AS $b$SELECT ('{' || btrim(p, '[]{} ') || '}')::real[]$b$$f$;
        -- Embeddings are unit vectors: cosine distance is 1 - dot product.
        EXECUTE $f$CREATE OR REPLACE FUNCTION app.cosine_distance(a real[], b real[]) RETURNS double precision
                   LANGUAGE sql IMMUTABLE PARALLEL SAFE
                   AS $b$SELECT 1 - sum(x * y) FROM unnest(a, b) AS t(x, y)$b$$f$;
    END IF;
END
$do$;

-- Indexing state of each document, kept by the worker. Only changes to the document itself move
-- its updated_at (the worker compares it to detect a change made while it was embedding).
CREATE OR REPLACE TRIGGER knowledge_base_touch_updated_at
    BEFORE UPDATE OF title, content, source, language, metadata ON knowledge_base
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

ALTER TABLE knowledge_base ADD COLUMN IF NOT EXISTS index_status varchar(20) NOT NULL DEFAULT 'pending';
ALTER TABLE knowledge_base ADD COLUMN IF NOT EXISTS indexed_at timestamptz;
ALTER TABLE knowledge_base ADD COLUMN IF NOT EXISTS index_error text;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'knowledge_base_index_status_valid') THEN
        ALTER TABLE knowledge_base ADD CONSTRAINT knowledge_base_index_status_valid
            CHECK (index_status IN ('pending', 'indexing', 'indexed', 'failed'));
    END IF;
END
$$;

DO $$
DECLARE
    embedding_type text := CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')
                                THEN 'vector' ELSE 'real[]' END;
BEGIN
    EXECUTE format($t$
        CREATE TABLE IF NOT EXISTS knowledge_chunks (
            tenant_id       uuid NOT NULL DEFAULT app.current_tenant_id(),
            document_id     bigint NOT NULL,
            chunk_no        integer NOT NULL,
            content         text NOT NULL,
            char_start      integer NOT NULL,
            char_end        integer NOT NULL,
            heading_path    text NOT NULL DEFAULT '',
            language        varchar(8),
            ts_config       regconfig NOT NULL,
            content_hash    char(64) NOT NULL,
            tsv             tsvector NOT NULL,
            embedding       %s,
            embedding_model varchar(100),
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, document_id, chunk_no),
            CONSTRAINT knowledge_chunks_document_fkey FOREIGN KEY (tenant_id, document_id)
                REFERENCES knowledge_base (tenant_id, id) ON DELETE CASCADE,
            CONSTRAINT knowledge_chunks_offsets CHECK (0 <= char_start AND char_start <= char_end)
        )$t$, embedding_type);
END
$$;

CREATE INDEX IF NOT EXISTS idx_knowledge_chunks_tenant_created ON knowledge_chunks (tenant_id, created_at DESC);
CREATE INDEX IF NOT EXISTS idx_knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv);
-- Semantic search reads one tenant's vectors from this index alone (measured by
-- bench/retrieval.py: 5,000 vectors in ~1.5 ms instead of ~15 ms of TOAST reads); tsvectors stay
-- in the row for the keyword side.
CREATE INDEX IF NOT EXISTS idx_knowledge_chunks_tenant_model_vectors
    ON knowledge_chunks (tenant_id, embedding_model) INCLUDE (document_id, chunk_no, embedding);
ALTER TABLE knowledge_chunks ALTER COLUMN tsv SET STORAGE MAIN;

CREATE TABLE IF NOT EXISTS knowledge_jobs (
    tenant_id   uuid NOT NULL DEFAULT app.current_tenant_id(),
    id          bigint GENERATED BY DEFAULT AS IDENTITY,
    document_id bigint NOT NULL,
    kind        varchar(20) NOT NULL DEFAULT 'index',
    status      varchar(20) NOT NULL DEFAULT 'queued',
    attempts    integer NOT NULL DEFAULT 0,
    run_after   timestamptz NOT NULL DEFAULT now(),
    locked_at   timestamptz,
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT knowledge_jobs_document_fkey FOREIGN KEY (tenant_id, document_id)
        REFERENCES knowledge_base (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT knowledge_jobs_kind_valid CHECK (kind IN ('index', 'reembed')),
    CONSTRAINT knowledge_jobs_status_valid CHECK (status IN ('queued', 'running', 'done', 'failed'))
);
CREATE INDEX IF NOT EXISTS idx_knowledge_jobs_tenant_created ON knowledge_jobs (tenant_id, created_at DESC);
CREATE INDEX IF NOT EXISTS idx_knowledge_jobs_queue ON knowledge_jobs (run_after, id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS idx_knowledge_jobs_document ON knowledge_jobs (tenant_id, document_id);

CREATE OR REPLACE TRIGGER knowledge_jobs_touch_updated_at
    BEFORE UPDATE ON knowledge_jobs
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['knowledge_chunks', 'knowledge_jobs'] LOOP
        EXECUTE format('ALTER TABLE %I OWNER TO iaf_owner', t);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %I', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I AS PERMISSIVE FOR ALL TO PUBLIC '
                       'USING (tenant_id = (SELECT app.current_tenant_id())) '
                       'WITH CHECK (tenant_id = (SELECT app.current_tenant_id()))', t);
        EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO iaf_app', t);
    END LOOP;
END
$$;

-- The search and queue functions below run as iaf_owner and filter on the transaction's tenant
-- themselves; these policies let them do so without an RLS qual, so that the planner may use the
-- full-text GIN index (`@@` is not leakproof: under a policy it is evaluated above it).
DROP POLICY IF EXISTS definer_read ON knowledge_chunks;
CREATE POLICY definer_read ON knowledge_chunks AS PERMISSIVE FOR SELECT TO iaf_owner USING (true);
DROP POLICY IF EXISTS definer_read ON knowledge_base;
CREATE POLICY definer_read ON knowledge_base AS PERMISSIVE FOR SELECT TO iaf_owner USING (true);
DROP POLICY IF EXISTS definer_all ON knowledge_jobs;
CREATE POLICY definer_all ON knowledge_jobs AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);

-- Every change to a document's text queues its (re)indexing in the same transaction, whichever
-- path made it; pending jobs of the same document are superseded.
CREATE OR REPLACE FUNCTION app.queue_indexing() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF app.bulk_operation() THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.content IS NOT DISTINCT FROM OLD.content
       AND NEW.title IS NOT DISTINCT FROM OLD.title AND NEW.language IS NOT DISTINCT FROM OLD.language THEN
        RETURN NEW;
    END IF;
    UPDATE public.knowledge_jobs SET status = 'done', last_error = 'superseded'
    WHERE tenant_id = NEW.tenant_id AND document_id = NEW.id AND status = 'queued';
    INSERT INTO public.knowledge_jobs (tenant_id, document_id, kind) VALUES (NEW.tenant_id, NEW.id, 'index');
    NEW.index_status := 'pending';
    NEW.index_error := NULL;
    PERFORM pg_notify('iafactory_knowledge_jobs', '');
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS knowledge_base_queue_indexing ON knowledge_base;
CREATE OR REPLACE FUNCTION app.queue_indexing_after_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF app.bulk_operation() THEN
        RETURN NULL;
    END IF;
    INSERT INTO public.knowledge_jobs (tenant_id, document_id, kind) VALUES (NEW.tenant_id, NEW.id, 'index');
    PERFORM pg_notify('iafactory_knowledge_jobs', '');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER knowledge_base_queue_indexing_insert
    AFTER INSERT ON knowledge_base
    FOR EACH ROW EXECUTE FUNCTION app.queue_indexing_after_insert();
CREATE OR REPLACE TRIGGER knowledge_base_queue_indexing_update
    BEFORE UPDATE OF content, title, language ON knowledge_base
    FOR EACH ROW EXECUTE FUNCTION app.queue_indexing();

-- Documents that existed before this migration get their first indexing job (idempotent).
INSERT INTO knowledge_jobs (tenant_id, document_id, kind)
SELECT d.tenant_id, d.id, 'index' FROM knowledge_base d
WHERE NOT EXISTS (SELECT 1 FROM knowledge_chunks c WHERE c.tenant_id = d.tenant_id AND c.document_id = d.id)
  AND NOT EXISTS (SELECT 1 FROM knowledge_jobs j WHERE j.tenant_id = d.tenant_id AND j.document_id = d.id
                  AND j.status IN ('queued', 'running'));

-- A worker claims the oldest runnable job of any tenant. SKIP LOCKED lets several workers share
-- the queue; a job left 'running' by a worker that died is claimed again after five minutes. The
-- worker then does the job inside a transaction of that job's tenant.
CREATE OR REPLACE FUNCTION app.claim_knowledge_job()
    RETURNS TABLE (tenant_id uuid, id bigint, document_id bigint, kind text, attempts integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        UPDATE public.knowledge_jobs j
        SET status = 'running', locked_at = now(), attempts = j.attempts + 1
        FROM (SELECT q.tenant_id, q.id FROM public.knowledge_jobs q
              WHERE (q.status = 'queued' AND q.run_after <= now())
                 OR (q.status = 'running' AND q.locked_at < now() - interval '5 minutes')
              ORDER BY q.run_after, q.id
              LIMIT 1
              FOR UPDATE SKIP LOCKED) next
        WHERE j.tenant_id = next.tenant_id AND j.id = next.id
        RETURNING j.tenant_id, j.id, j.document_id, j.kind::text, j.attempts;
END
$$;

-- Hybrid retrieval for the transaction's tenant (never an argument): the k best passages by
-- reciprocal rank fusion of full-text and vector ranks, in one statement.
CREATE OR REPLACE FUNCTION app.search_knowledge(
    p_query_text text, p_query_config text, p_query_embedding text, p_model text, p_k integer,
    p_mode text, p_document_ids bigint[], p_language text, p_metadata jsonb)
    RETURNS TABLE (document_id bigint, title text, chunk_no integer, content text, char_start integer,
                   char_end integer, heading_path text, language text, score double precision,
                   keyword_rank bigint, semantic_rank bigint)
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
        -- In hybrid mode the keyword side speaks only for passages holding at least half of the
        -- query's words: fusion adds the two rankings, and a passage sharing one common word
        -- with the query would otherwise outrank the right passage found by meaning alone (for
        -- instance in another language).
        IF p_mode = 'hybrid' THEN
            SELECT array_agg(q) INTO v_words FROM (
                SELECT to_tsquery('simple', string_agg(DISTINCT quote_literal(l), ' | ')) AS q
                FROM unnest(tsvector_to_array(to_tsvector('simple', p_query_text))) AS s (word)
                CROSS JOIN LATERAL (
                    SELECT unnest(tsvector_to_array(to_tsvector(p_query_config::regconfig, s.word)))
                    UNION SELECT s.word) AS lex (l)
                WHERE to_tsvector(p_query_config::regconfig, s.word) <> ''::tsvector
                GROUP BY s.word) per_word;
            v_need := ceil(coalesce(cardinality(v_words), 0) / 2.0);
        END IF;
    END IF;
    RETURN QUERY
    WITH docs AS (
        SELECT d.id FROM public.knowledge_base d
        WHERE d.tenant_id = v_tenant
          AND (p_document_ids IS NULL OR d.id = ANY (p_document_ids))
          AND (p_metadata IS NULL OR d.metadata @> p_metadata)
    ),
    -- Each side takes its v_pool best first (a top-N sort), then numbers them. Without a
    -- document filter every chunk's document qualifies (foreign key), so the semantic side skips
    -- the semi-join with docs and reads the tenant's vectors from the covering index alone. The
    -- keyword side keeps it: it leads a small tenant to its own chunks (by document) rather
    -- than through the GIN index's posting lists, which are the whole corpus's.
    keyword AS (
        SELECT m.document_id, m.chunk_no, row_number() OVER (ORDER BY m.rank DESC, m.document_id, m.chunk_no) AS r
        FROM (SELECT c.document_id, c.chunk_no, ts_rank_cd(c.tsv, v_query) AS rank
              FROM public.knowledge_chunks c
              WHERE v_query IS NOT NULL AND c.tenant_id = v_tenant AND c.tsv @@ v_query
                AND c.document_id IN (SELECT id FROM docs)
                AND (p_language IS NULL OR c.language = p_language)
                AND (v_need <= 1 OR (SELECT count(*) FROM unnest(v_words) AS w (q) WHERE c.tsv @@ w.q) >= v_need)
              ORDER BY 3 DESC, 1, 2
              LIMIT v_pool) m
    ),
    semantic AS (
        SELECT m.document_id, m.chunk_no, row_number() OVER (ORDER BY m.distance, m.document_id, m.chunk_no) AS r
        FROM (SELECT c.document_id, c.chunk_no,
                     app.cosine_distance(c.embedding, app.to_embedding(p_query_embedding)) AS distance
              FROM public.knowledge_chunks c
              WHERE p_mode IN ('hybrid', 'semantic') AND p_query_embedding IS NOT NULL
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
    )
    SELECT f.document_id, d.title::text, f.chunk_no, c.content, c.char_start, c.char_end, c.heading_path,
           c.language::text, f.score::double precision, f.keyword_rank, f.semantic_rank
    FROM fused f
    JOIN public.knowledge_chunks c ON c.tenant_id = v_tenant AND c.document_id = f.document_id AND c.chunk_no = f.chunk_no
    JOIN public.knowledge_base d ON d.tenant_id = v_tenant AND d.id = f.document_id
    ORDER BY f.score DESC, f.document_id, f.chunk_no
    LIMIT least(greatest(p_k, 1), 50);
END
$$;

CALL app.lock_down_functions();
