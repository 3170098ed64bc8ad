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

CALL app.lock_down_functions();
