-- 016: figures for /metrics that no tenant scope can see.
--
-- The application role sees no knowledge_jobs rows without a tenant set (RLS), yet the scrape
-- wants the depth of the whole queue. This definer function answers with aggregate numbers
-- only: no tenant id, no row, nothing a caller could steer (it takes no argument).
-- It reads the partial index idx_knowledge_jobs_queue (status = 'queued'), so a scrape costs the
-- pending jobs, not the table's history.

CREATE OR REPLACE FUNCTION app.knowledge_job_stats()
    RETURNS TABLE (pending bigint, runnable bigint, oldest_pending_age_seconds double precision)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT count(*),
               count(*) FILTER (WHERE j.run_after <= now()),
               coalesce(extract(epoch FROM now() - min(j.created_at))::double precision, 0)
        FROM public.knowledge_jobs j
        WHERE j.status = 'queued'
    $$;

COMMENT ON FUNCTION app.knowledge_job_stats() IS
    'Aggregate size and age of the indexing queue across tenants, for /metrics; no per-tenant figure.';

-- Owned by iaf_owner, EXECUTE revoked from PUBLIC and granted to iaf_app only.
CALL app.lock_down_functions();
