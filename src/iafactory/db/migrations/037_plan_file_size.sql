-- 037: the largest single file a tenant may upload (POST /knowledge-base/files, `iafactory
-- knowledge import`), per plan: max_file_bytes, free 5 MiB, pro 20 MiB, enterprise 50 MiB,
-- overridable per tenant like every other limit (tenants.settings->'limits'). The application
-- checks it before storing anything (413, field `file`); the platform's kb_max_file_bytes setting
-- stays the ceiling the body-size middleware enforces before the tenant is known, so the limit in
-- force is the smaller of the two.

-- Added with a default (no table rewrite), then each plan's value set. The default stays: 010's
-- INSERT of the plans, run again (a runner adopting a database built with psql), names the columns
-- it knows and must not break the NOT NULL (it then does nothing: ON CONFLICT).
CALL app.run_ddl_briefly($$ALTER TABLE public.plan_limits
    ADD COLUMN IF NOT EXISTS max_file_bytes bigint NOT NULL DEFAULT 20971520$$);
UPDATE plan_limits SET max_file_bytes = 5242880 WHERE plan = 'free' AND max_file_bytes <> 5242880;
UPDATE plan_limits SET max_file_bytes = 52428800 WHERE plan = 'enterprise' AND max_file_bytes <> 52428800;

-- The limits in force for a tenant, as in 020 with max_file_bytes last (a new output column:
-- DROP and CREATE). Its callers read columns by name (app.enforce_plan_limit, 030;
-- platform.grant_monthly and grant_monthly_to, 020; the application's SELECT *), and a plpgsql
-- body holds no dependency, so nothing else is dropped with it. (010 drops it too before making
-- its own, so that every file can run again in order.)
DROP FUNCTION IF EXISTS app.tenant_limits(uuid);
CREATE FUNCTION app.tenant_limits(p_tenant uuid)
    RETURNS TABLE (plan text, requests_per_minute integer, key_requests_per_minute integer,
                   max_members integer, max_api_keys integer, max_kb_bytes bigint, monthly_credits bigint,
                   max_file_bytes bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT t.plan::text,
               coalesce((t.settings->'limits'->>'requests_per_minute')::integer, p.requests_per_minute),
               coalesce((t.settings->'limits'->>'key_requests_per_minute')::integer, p.key_requests_per_minute),
               coalesce((t.settings->'limits'->>'max_members')::integer, p.max_members),
               coalesce((t.settings->'limits'->>'max_api_keys')::integer, p.max_api_keys),
               coalesce((t.settings->'limits'->>'max_kb_bytes')::bigint, p.max_kb_bytes),
               coalesce((t.settings->'limits'->>'monthly_credits')::bigint, p.monthly_credits),
               coalesce((t.settings->'limits'->>'max_file_bytes')::bigint, p.max_file_bytes)
        FROM public.tenants t JOIN public.plan_limits p ON p.plan = t.plan
        WHERE t.id = p_tenant;
END
$$;

-- As in 020, with max_file_bytes among the limits an override may name.
CREATE OR REPLACE FUNCTION platform.tenant_set_limits(p_id uuid, p_limits jsonb)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    IF EXISTS (SELECT 1 FROM jsonb_each(coalesce(p_limits, '{}'::jsonb)) e
               WHERE e.key NOT IN ('requests_per_minute', 'key_requests_per_minute', 'max_members',
                                   'max_api_keys', 'max_kb_bytes', 'monthly_credits', 'max_file_bytes')
                  OR jsonb_typeof(e.value) NOT IN ('number', 'null')) THEN
        RAISE EXCEPTION 'unknown limit or non-numeric value in %', p_limits USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY
        UPDATE public.tenants t
        SET settings = CASE WHEN p_limits IS NULL OR p_limits = '{}'::jsonb THEN t.settings - 'limits'
                            ELSE jsonb_set(t.settings, '{limits}', jsonb_strip_nulls(p_limits)) END
        WHERE t.id = p_id
        RETURNING t.id, t.name, t.slug, t.region, t.plan, t.status, t.admin_email, t.admin_phone, t.settings,
                  t.metadata, t.created_at, t.updated_at, t.trial_ends_at;
END
$$;

CALL app.lock_down_functions();
