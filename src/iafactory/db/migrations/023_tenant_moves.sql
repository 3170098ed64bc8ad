-- 023: moving a tenant between cells (issue 12): the move journal, the write freeze, erasure notes.
--
-- `iafactory tenants move SLUG --region XX` copies a tenant from the cell that holds it to the cell
-- serving XX. Its steps are journalled in the directory (directory.tenant_moves, one active move
-- per tenant), so that a mover killed at any point resumes from the last step it recorded.
--
-- While it moves, the tenant is read-only in its source cell: a row in tenant_freezes makes
-- app.authorize refuse writes with IA503 (HTTP 503 + Retry-After); reads go on. The column is
-- `frozen_tenant`, not `tenant_id`: the freeze is the mover's, not tenant data, so exports,
-- erasure and the isolation rules leave it alone. The target cell holds the copy frozen too until
-- the move is complete.

CREATE TABLE IF NOT EXISTS directory.tenant_moves (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    slug        varchar(63) NOT NULL,
    from_cell   text NOT NULL CHECK (from_cell ~ '^[a-z][a-z0-9-]{0,31}$'),
    to_cell     text NOT NULL CHECK (to_cell ~ '^[a-z][a-z0-9-]{0,31}$'),
    from_region varchar(2) NOT NULL,
    to_region   varchar(2) NOT NULL CHECK (to_region IN ('DZ', 'CH', 'FR', 'BE', 'CA')),
    -- started → frozen → copied → switched → erased → done; or failed (the tenant stayed where it was).
    step        text NOT NULL DEFAULT 'started'
                CHECK (step IN ('started', 'frozen', 'copied', 'switched', 'erased', 'done', 'failed')),
    -- Per table: {"rows": n, "sha256": "…"} as computed in the source and in the target.
    checksums   jsonb NOT NULL DEFAULT '{}'::jsonb,
    frozen_at   timestamptz,
    unfrozen_at timestamptz,
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- One move at a time per tenant.
CREATE UNIQUE INDEX IF NOT EXISTS directory_tenant_moves_active ON directory.tenant_moves (tenant_id)
    WHERE step NOT IN ('done', 'failed');
ALTER TABLE directory.tenant_moves OWNER TO iaf_owner;
REVOKE ALL ON directory.tenant_moves FROM PUBLIC;
GRANT SELECT ON directory.tenant_moves TO iaf_app;

CREATE TABLE IF NOT EXISTS tenant_freezes (
    frozen_tenant uuid PRIMARY KEY,
    reason        text NOT NULL,
    retry_after   integer NOT NULL DEFAULT 30 CHECK (retry_after > 0),
    frozen_at     timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tenant_freezes OWNER TO iaf_owner;
REVOKE ALL ON tenant_freezes FROM PUBLIC;  -- read by app.authorize (a definer function) only

-- Why a tenant's rows were erased (an operator's erasure, or a move to another cell).
ALTER TABLE tenant_erasures ADD COLUMN IF NOT EXISTS reason text;

CREATE OR REPLACE FUNCTION app.authorize(p_min_role text, p_write boolean) RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_tenant uuid := app.current_tenant_id();
    v_key_id uuid := nullif(current_setting('app.api_key_id', true), '')::uuid;
    v_user_id integer := app.current_user_id();
    v_status text;
    v_trial_ends_at timestamptz;
    v_role text;
    v_is_active boolean;
    v_key uuid;
    v_scope text;
    v_expires_at timestamptz;
    v_revoked_at timestamptz;
    v_retry_after integer;
BEGIN
    IF v_key_id IS NULL THEN
        SELECT t.status, t.trial_ends_at, tu.role, u.is_active
          INTO v_status, v_trial_ends_at, v_role, v_is_active
          FROM public.tenants t
          LEFT JOIN public.tenant_users tu ON tu.tenant_id = v_tenant AND tu.user_id = v_user_id
          LEFT JOIN public.users u ON u.id = tu.user_id
         WHERE t.id = v_tenant;
    ELSE
        SELECT t.status, t.trial_ends_at, k.id, k.scope, k.expires_at, k.revoked_at
          INTO v_status, v_trial_ends_at, v_key, v_scope, v_expires_at, v_revoked_at
          FROM public.tenants t
          LEFT JOIN public.api_keys k ON k.tenant_id = v_tenant AND k.id = v_key_id
         WHERE t.id = v_tenant;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant not found or not accessible' USING ERRCODE = 'IA403';
    END IF;
    IF v_status = 'suspended' THEN
        RAISE EXCEPTION 'tenant is suspended' USING ERRCODE = 'IA403';
    ELSIF v_status = 'cancelled' THEN
        RAISE EXCEPTION 'tenant is cancelled' USING ERRCODE = 'IA403';
    ELSIF p_write AND v_status = 'trial' AND v_trial_ends_at IS NOT NULL AND v_trial_ends_at <= now() THEN
        -- An expired trial needs no job to flip it: reads are still allowed, writes wait for a plan.
        RAISE EXCEPTION 'trial ended on %: reads are allowed, writes need an active subscription',
            to_char(v_trial_ends_at, 'YYYY-MM-DD') USING ERRCODE = 'IA403';
    END IF;

    IF v_key_id IS NOT NULL THEN
        IF v_key IS NULL THEN
            RAISE EXCEPTION 'unknown API key' USING ERRCODE = 'IA401';
        ELSIF v_revoked_at IS NOT NULL THEN
            RAISE EXCEPTION 'API key has been revoked' USING ERRCODE = 'IA401';
        ELSIF v_expires_at IS NOT NULL AND v_expires_at <= now() THEN
            RAISE EXCEPTION 'API key has expired' USING ERRCODE = 'IA401';
        ELSIF p_write AND v_scope <> 'write' THEN
            RAISE EXCEPTION 'this API key is read-only' USING ERRCODE = 'IA403';
        END IF;
        v_role := CASE v_scope WHEN 'write' THEN 'member' ELSE 'viewer' END;
    ELSE
        IF v_role IS NULL THEN
            RAISE EXCEPTION 'not a member of this tenant' USING ERRCODE = 'IA403';
        ELSIF NOT coalesce(v_is_active, false) THEN
            RAISE EXCEPTION 'account is disabled' USING ERRCODE = 'IA401';
        END IF;
    END IF;

    -- A tenant being moved to another cell is read-only here (migration 023): one index probe on
    -- a table that is empty but for tenants in the middle of a move, and only for writes.
    IF p_write THEN
        SELECT f.retry_after INTO v_retry_after FROM public.tenant_freezes f WHERE f.frozen_tenant = v_tenant;
        IF FOUND THEN
            RAISE EXCEPTION 'tenant is being moved to another region: reads are allowed, writes are not'
                USING ERRCODE = 'IA503', DETAIL = 'retry_after=' || v_retry_after;
        END IF;
    END IF;

    IF app.role_rank(v_role) < app.role_rank(p_min_role) THEN
        RAISE EXCEPTION 'this action requires the % role (you are %)', p_min_role, v_role
            USING ERRCODE = 'IA403';
    END IF;
END
$$;

CALL app.lock_down_functions();
