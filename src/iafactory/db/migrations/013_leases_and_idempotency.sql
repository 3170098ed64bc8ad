-- 013: indexing jobs held by a short lease that their worker renews; idempotency keys for creates.

------------------------------------------------------------------------------------------------
-- Indexing leases. A job claimed by a worker used to stay 'running' for five minutes when that
-- worker died or was stopped. Now a claim holds the job until lease_until (a short lease, e.g.
-- 25 s), which the worker's heartbeat pushes forward while the job runs; a worker that stops
-- gives its job back at once, and a worker that dies loses it when the lease runs out. The
-- token names one claim: a worker whose lease ran out (and whose job was claimed again) can
-- neither renew nor finish it.
------------------------------------------------------------------------------------------------
ALTER TABLE knowledge_jobs ADD COLUMN IF NOT EXISTS lease_until timestamptz;
ALTER TABLE knowledge_jobs ADD COLUMN IF NOT EXISTS lease_token uuid;
ALTER TABLE knowledge_jobs ADD COLUMN IF NOT EXISTS worker varchar(200);

-- Jobs claimed before this migration keep the five minutes they were promised.
UPDATE knowledge_jobs SET lease_until = locked_at + interval '5 minutes'
WHERE status = 'running' AND lease_until IS NULL;

CREATE INDEX IF NOT EXISTS idx_knowledge_jobs_leases ON knowledge_jobs (lease_until) WHERE status = 'running';

-- The oldest runnable job of any tenant: queued and due, or running on a lease that ran out.
CREATE OR REPLACE FUNCTION app.claim_knowledge_job(p_lease_seconds integer, p_worker text)
    RETURNS TABLE (tenant_id uuid, id bigint, document_id bigint, kind text, attempts integer, lease_token uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'a lease is at least one second' USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY
        UPDATE public.knowledge_jobs j
        SET status = 'running', locked_at = now(), attempts = j.attempts + 1,
            lease_until = now() + make_interval(secs => p_lease_seconds),
            lease_token = gen_random_uuid(), worker = left(p_worker, 200)
        FROM (SELECT q.tenant_id, q.id FROM public.knowledge_jobs q
              WHERE (q.status = 'queued' AND q.run_after <= now())
                 OR (q.status = 'running' AND coalesce(q.lease_until, q.locked_at + interval '5 minutes') < now())
              ORDER BY q.run_after, q.id
              LIMIT 1
              FOR UPDATE SKIP LOCKED) next
        WHERE j.tenant_id = next.tenant_id AND j.id = next.id
        RETURNING j.tenant_id, j.id, j.document_id, j.kind::text, j.attempts, j.lease_token;
END
$$;

-- 011's claim, for workers of an earlier version still running during an upgrade: a five-minute
-- lease, and it no longer takes a job whose lease is being renewed.
CREATE OR REPLACE FUNCTION app.claim_knowledge_job()
    RETURNS TABLE (tenant_id uuid, id bigint, document_id bigint, kind text, attempts integer)
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT c.tenant_id, c.id, c.document_id, c.kind, c.attempts
        FROM app.claim_knowledge_job(300, 'unversioned worker') c
    $$;

------------------------------------------------------------------------------------------------
-- Idempotency keys. A create sent with `Idempotency-Key: K` records K, a hash of the request and
-- the answer it got in the same transaction as the record it creates: after a crash both exist
-- or neither does. A retry with K gets the stored answer instead of a second record (and a second
-- debit of credits). Keys are per tenant; the principal (user or API key) that used one is kept,
-- and only it gets the answer back. Kept at least 24 hours (IAFACTORY_IDEMPOTENCY_KEY_TTL_SECONDS).
------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id     uuid NOT NULL DEFAULT app.current_tenant_id() REFERENCES tenants (id) ON DELETE RESTRICT,
    key           varchar(255) NOT NULL,
    principal     varchar(100) NOT NULL,   -- 'user:<id>' or 'key:<uuid>'
    request_hash  char(64) NOT NULL,       -- SHA-256 of method, path and canonical JSON body
    status_code   smallint,                -- the answer; NULL only inside the creating transaction
    response_body bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS idx_idempotency_keys_tenant_created ON idempotency_keys (tenant_id, created_at DESC);
CREATE INDEX IF NOT EXISTS idx_idempotency_keys_tenant_expires ON idempotency_keys (tenant_id, expires_at);
CREATE INDEX IF NOT EXISTS idx_idempotency_keys_expires ON idempotency_keys (expires_at);

-- The same protection as every tenant table (008 applied it only to the tables of its time).
ALTER TABLE idempotency_keys OWNER TO iaf_owner;
ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON idempotency_keys;
CREATE POLICY tenant_isolation ON idempotency_keys AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant_id = (SELECT app.current_tenant_id()))
    WITH CHECK (tenant_id = (SELECT app.current_tenant_id()));
-- For app.purge_idempotency_keys, which works across tenants.
DROP POLICY IF EXISTS definer_all ON idempotency_keys;
CREATE POLICY definer_all ON idempotency_keys AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON idempotency_keys FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO iaf_app;

-- Claim `p_key` for a request, in the request's own transaction (as the application, under RLS).
-- claimed: the key is new (or expired): go ahead, and store the answer before committing. Not
-- claimed: the stored request's principal, hash and answer. A request holding the key right now
-- makes this wait for its outcome, at most lock_timeout (then 55P03: the caller answers 409).
-- A few expired keys of the tenant are deleted on the way.
CREATE OR REPLACE FUNCTION app.claim_idempotency_key(p_tenant uuid, p_key text, p_principal text,
                                                     p_request_hash text, p_ttl_seconds integer)
    RETURNS TABLE (claimed boolean, principal text, request_hash text, status_code integer, response_body bytea)
    LANGUAGE plpgsql SET search_path = '' SET lock_timeout = '5s'
    AS $$
#variable_conflict use_column
BEGIN
    DELETE FROM public.idempotency_keys
    WHERE tenant_id = p_tenant AND ctid = ANY (ARRAY(
        SELECT k.ctid FROM public.idempotency_keys k
        WHERE k.tenant_id = p_tenant AND k.expires_at <= now() AND k.key <> p_key
        LIMIT 20 FOR UPDATE SKIP LOCKED));
    INSERT INTO public.idempotency_keys AS k (tenant_id, key, principal, request_hash, expires_at)
    VALUES (p_tenant, p_key, p_principal, p_request_hash, now() + make_interval(secs => p_ttl_seconds))
    ON CONFLICT (tenant_id, key) DO UPDATE
        SET principal = EXCLUDED.principal, request_hash = EXCLUDED.request_hash, status_code = NULL,
            response_body = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= now();
    IF FOUND THEN
        RETURN QUERY SELECT true, p_principal, p_request_hash, NULL::integer, NULL::bytea;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT false, k.principal::text, k.request_hash::text, k.status_code::integer, k.response_body
        FROM public.idempotency_keys k WHERE k.tenant_id = p_tenant AND k.key = p_key;
END
$$;

-- Expired keys of every tenant, a batch at a time (the indexing worker calls it when idle).
CREATE OR REPLACE FUNCTION app.purge_idempotency_keys(p_limit integer DEFAULT 1000) RETURNS integer
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$
        WITH gone AS (
            DELETE FROM public.idempotency_keys
            WHERE ctid = ANY (ARRAY(SELECT k.ctid FROM public.idempotency_keys k WHERE k.expires_at <= now()
                                    ORDER BY k.expires_at LIMIT least(greatest(p_limit, 1), 10000)
                                    FOR UPDATE SKIP LOCKED))
            RETURNING 1)
        SELECT count(*)::integer FROM gone
    $$;

CALL app.lock_down_functions();
