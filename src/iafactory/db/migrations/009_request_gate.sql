-- 009: the per-request gate, API-key authentication, and member lookups for the HTTP service.
--
-- app.authorize() runs inside every request's tenant transaction, in the same round trip as the
-- request's first statement. It re-checks against the database what a token only claims:
-- membership and role (a removed or demoted member loses access on the next request), tenant
-- status, and, for API keys, revocation, expiry and scope. It raises with a dedicated SQLSTATE
-- that the service turns into 401 / 403:
--   IA401  the credential is no longer valid (revoked or expired key, disabled account)
--   IA403  valid credential, but not allowed (not a member, role too low, tenant suspended ...)

CREATE OR REPLACE FUNCTION app.role_rank(p_role text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT array_position(ARRAY['viewer', 'member', 'admin', 'owner'], p_role) $$;

CREATE OR REPLACE FUNCTION app.authorize(p_min_role text, p_write boolean) RETURNS void
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
    v_key_id uuid := nullif(current_setting('app.api_key_id', true), '')::uuid;
    v_user_id integer := app.current_user_id();
    r record;
    v_role text;
BEGIN
    -- One statement, run as the caller: RLS shows only the current tenant's rows.
    SELECT t.status, t.trial_ends_at, tu.role AS member_role, u.is_active,
           k.id AS key_id, k.scope, k.expires_at, k.revoked_at
      INTO r
      FROM public.tenants t
      LEFT JOIN public.tenant_users tu
             ON v_key_id IS NULL AND tu.tenant_id = t.id AND tu.user_id = v_user_id
      LEFT JOIN public.users u ON v_key_id IS NULL AND u.id = v_user_id
      LEFT JOIN public.api_keys k ON v_key_id IS NOT NULL AND k.tenant_id = t.id AND k.id = v_key_id
     WHERE t.id = app.current_tenant_id();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant not found or not accessible' USING ERRCODE = 'IA403';
    END IF;
    IF r.status = 'suspended' THEN
        RAISE EXCEPTION 'tenant is suspended' USING ERRCODE = 'IA403';
    ELSIF r.status = 'cancelled' THEN
        RAISE EXCEPTION 'tenant is cancelled' USING ERRCODE = 'IA403';
    ELSIF p_write AND r.status = 'trial' AND r.trial_ends_at IS NOT NULL AND r.trial_ends_at <= now() THEN
        -- An expired trial needs no job to flip it: reads are still allowed, writes wait for a plan.
        RAISE EXCEPTION 'trial ended on %: reads are allowed, writes need an active subscription',
            to_char(r.trial_ends_at, 'YYYY-MM-DD') USING ERRCODE = 'IA403';
    END IF;

    IF v_key_id IS NOT NULL THEN
        IF r.key_id IS NULL THEN
            RAISE EXCEPTION 'unknown API key' USING ERRCODE = 'IA401';
        ELSIF r.revoked_at IS NOT NULL THEN
            RAISE EXCEPTION 'API key has been revoked' USING ERRCODE = 'IA401';
        ELSIF r.expires_at IS NOT NULL AND r.expires_at <= now() THEN
            RAISE EXCEPTION 'API key has expired' USING ERRCODE = 'IA401';
        ELSIF p_write AND r.scope <> 'write' THEN
            RAISE EXCEPTION 'this API key is read-only' USING ERRCODE = 'IA403';
        END IF;
        v_role := CASE r.scope WHEN 'write' THEN 'member' ELSE 'viewer' END;
    ELSE
        IF r.member_role IS NULL THEN
            RAISE EXCEPTION 'not a member of this tenant' USING ERRCODE = 'IA403';
        ELSIF NOT coalesce(r.is_active, false) THEN
            RAISE EXCEPTION 'account is disabled' USING ERRCODE = 'IA401';
        END IF;
        v_role := r.member_role;
    END IF;

    IF app.role_rank(v_role) < app.role_rank(p_min_role) THEN
        RAISE EXCEPTION 'this action requires the % role (you are %)', p_min_role, v_role
            USING ERRCODE = 'IA403';
    END IF;
END
$$;

-- API-key authentication before the tenant is known: the key row for a prefix, with last use
-- recorded at most once a minute (a write per request would cost more than it tells).
DROP POLICY IF EXISTS definer_touch ON api_keys;
CREATE POLICY definer_touch ON api_keys AS PERMISSIVE FOR UPDATE TO iaf_owner USING (true) WITH CHECK (true);

CREATE OR REPLACE FUNCTION app.authenticate_api_key(p_prefix text)
    RETURNS TABLE (tenant_id uuid, id uuid, key_hash bytea, scope text, expires_at timestamptz,
                   revoked_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    UPDATE public.api_keys k SET last_used_at = now()
    WHERE k.prefix = p_prefix AND k.revoked_at IS NULL
      AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute');
    RETURN QUERY
        SELECT k.tenant_id, k.id, k.key_hash, k.scope::text, k.expires_at, k.revoked_at
        FROM public.api_keys k WHERE k.prefix = p_prefix;
END
$$;

-- Adding a member by email: the user's id, and nothing else about them.
CREATE OR REPLACE FUNCTION app.find_user_id(p_email text) RETURNS integer
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$ SELECT u.id FROM public.users u WHERE lower(u.email) = lower(p_email) $$;

-- The application may read members' emails and names through the users policy; it may add,
-- re-role and remove members of the current tenant through RLS on tenant_users.

-- Operators (CLI) grant or withdraw platform administration.
CREATE OR REPLACE FUNCTION platform.set_platform_admin(p_email text, p_flag boolean) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id integer;
BEGIN
    PERFORM app.assert_platform_operator();
    UPDATE public.users SET is_platform_admin = p_flag WHERE lower(email) = lower(p_email) RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'no account with email %', p_email USING ERRCODE = 'IA404';
    END IF;
    RETURN v_id;
END
$$;

CALL app.lock_down_functions();
