-- iafactory:no-transaction
-- 019: keys and policies a distributed PostgreSQL (Citus, by tenant_id) accepts.
--
-- A table distributed by tenant_id can only enforce a primary key or a unique constraint that
-- includes tenant_id, and a Citus shard cannot evaluate a policy written with a subquery. So:
--   * the five tables of the single-tenant install get the primary key (tenant_id, id), from the
--     unique index 007 built (`<table>_tenant_id_id_key`): no new index, no scan (tenant_id is
--     already NOT NULL), only a brief ACCESS EXCLUSIVE lock taken with a 100 ms lock_timeout and
--     retried, as in 007, so a long reader never makes writers queue behind the change;
--   * every tenant policy becomes `tenant_id = app.current_tenant_id()` (the function is a
--     STABLE SQL expression that the planner inlines: it is still evaluated once per scan as an
--     index condition, and queries keep their explicit `tenant_id = $1`, which is what a
--     distributed planner routes on). ALTER POLICY swaps the expression in one statement.
-- Runs statement by statement (the marker above), each step idempotent and committed on its own.
-- Migration 020 does the rest (functions, the slug registry, triggers) in one transaction.

-- The primary key of one of the original tables moves to (tenant_id, id).
CREATE OR REPLACE PROCEDURE app.key_on_tenant(tbl text)
    LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := format('public.%I', tbl)::regclass;
    pk_name text := tbl || '_pkey';
    pk_columns text[];
BEGIN
    SELECT array_agg(a.attname::text ORDER BY k.i) INTO pk_columns
      FROM pg_index ix
      CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY k(n, i)
      JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n
     WHERE ix.indrelid = rel AND ix.indisprimary;
    IF pk_columns = ARRAY['tenant_id', 'id'] THEN
        RETURN;  -- done already
    END IF;
    -- A foreign key still resting on the single-column key would be dropped along with it.
    IF EXISTS (SELECT 1 FROM pg_constraint c
               WHERE c.contype = 'f' AND c.confrelid = rel
                 AND c.conindid = (SELECT indexrelid FROM pg_index WHERE indrelid = rel AND indisprimary)) THEN
        RAISE EXCEPTION '%: a foreign key still references its single-column primary key', tbl;
    END IF;
    CALL app.run_ddl_briefly(format(
        'ALTER TABLE public.%I DROP CONSTRAINT %I, ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I',
        tbl, pk_name, pk_name, tbl || '_tenant_id_id_key'));
    COMMIT;
END
$$;

CALL app.key_on_tenant('projects');
CALL app.key_on_tenant('knowledge_base');
CALL app.key_on_tenant('bolt_workflows');
CALL app.key_on_tenant('bmad_workflows');
CALL app.key_on_tenant('orchestrator_state');
DROP PROCEDURE IF EXISTS app.key_on_tenant(text);

-- The index became the primary key (and took its name). If 007 ever runs again it builds a copy
-- under the old name, which only slows writes: drop it.
DROP INDEX CONCURRENTLY IF EXISTS projects_tenant_id_id_key;
DROP INDEX CONCURRENTLY IF EXISTS knowledge_base_tenant_id_id_key;
DROP INDEX CONCURRENTLY IF EXISTS bolt_workflows_tenant_id_id_key;
DROP INDEX CONCURRENTLY IF EXISTS bmad_workflows_tenant_id_id_key;
DROP INDEX CONCURRENTLY IF EXISTS orchestrator_state_tenant_id_id_key;

-- Tenant policies without a subquery, on every table that has one (found in the catalog).
CREATE OR REPLACE PROCEDURE app.policies_without_subqueries()
    LANGUAGE plpgsql AS $$
DECLARE
    tables text[];
    t text;
BEGIN
    SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}') INTO tables
      FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
     WHERE p.polname = 'tenant_isolation' AND c.relnamespace = 'public'::regnamespace;
    FOREACH t IN ARRAY tables LOOP
        CALL app.run_ddl_briefly(format(
            'ALTER POLICY tenant_isolation ON public.%I '
            'USING (tenant_id = app.current_tenant_id()) WITH CHECK (tenant_id = app.current_tenant_id())', t));
        COMMIT;
    END LOOP;
    CALL app.run_ddl_briefly(
        'ALTER POLICY tenant_self ON public.tenants '
        'USING (id = app.current_tenant_id()) WITH CHECK (id = app.current_tenant_id())');
    COMMIT;
    CALL app.run_ddl_briefly(
        'ALTER POLICY users_self_update ON public.users '
        'USING (id = app.current_user_id()) WITH CHECK (id = app.current_user_id())');
    COMMIT;
END
$$;

CALL app.policies_without_subqueries();
DROP PROCEDURE IF EXISTS app.policies_without_subqueries();

-- A worker claims jobs one tenant at a time (020): the runnable jobs of one tenant, oldest first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_knowledge_jobs_tenant_queue
    ON knowledge_jobs (tenant_id, run_after, id) WHERE status = 'queued';
