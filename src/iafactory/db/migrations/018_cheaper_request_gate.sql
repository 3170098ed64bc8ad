-- 018: the same per-request gate and rate counter, at a fraction of their cost.
--
-- Every request runs app.rate_hit() (in a short transaction of its own) and app.authorize() (in
-- the request's transaction). Measured on the server, they were most of a request's database time:
--
-- * app.authorize() ran as the caller, so its four-way join went through the row-level policies
--   of tenants, tenant_users, users and api_keys (the users policy alone holds a subquery), and
--   its generic plan had to cover both credentials. It is now SECURITY DEFINER, like the other
--   pre-request functions, and names the transaction's tenant itself: app.current_tenant_id(),
--   the very setting the policies read, so it still sees nothing of any other tenant. One plain
--   join per kind of credential. Same checks, in the same order, with the same messages and
--   SQLSTATEs.
-- * app.rate_hit() reads the limits itself instead of calling app.tenant_limits() (a definer call
--   of its own), and makes its transaction's commit asynchronous: a counter increment lost in a
--   crash is harmless. (The service used to send that SET LOCAL as a statement of its own.)

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

    IF app.role_rank(v_role) < app.role_rank(p_min_role) THEN
        RAISE EXCEPTION 'this action requires the % role (you are %)', p_min_role, v_role
            USING ERRCODE = 'IA403';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION app.rate_hit(p_tenant uuid, p_api_key uuid) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_plan text;
    v_per_minute integer;
    v_key_per_minute integer;
    v_window timestamptz := date_trunc('minute', now());
    v_hits integer;
BEGIN
    -- Transaction-local, and this function's transaction is only the counter's.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The limits as app.tenant_limits() computes them (plan, then the tenant's overrides).
    SELECT t.plan::text,
           coalesce((t.settings->'limits'->>'requests_per_minute')::integer, p.requests_per_minute),
           coalesce((t.settings->'limits'->>'key_requests_per_minute')::integer, p.key_requests_per_minute)
      INTO v_plan, v_per_minute, v_key_per_minute
      FROM public.tenants t JOIN public.plan_limits p ON p.plan = t.plan
     WHERE t.id = p_tenant;
    IF NOT FOUND THEN
        RETURN;  -- unknown tenant: the request's own gate refuses it
    END IF;
    INSERT INTO public.rate_counters AS c (subject, window_start, hits)
    VALUES ('tenant:' || p_tenant, v_window, 1)
    ON CONFLICT (subject, window_start) DO UPDATE SET hits = c.hits + 1
    RETURNING hits INTO v_hits;
    IF v_hits = 1 THEN  -- first hit of a new window: forget the old ones
        DELETE FROM public.rate_counters WHERE subject = 'tenant:' || p_tenant AND window_start < v_window;
    END IF;
    IF v_hits > v_per_minute THEN
        RAISE EXCEPTION 'rate limit exceeded: % requests per minute for this tenant (plan %)', v_per_minute, v_plan
            USING ERRCODE = 'IA429', DETAIL = 'retry_after=' || greatest(1, 60 - extract(second FROM now())::integer);
    END IF;
    IF p_api_key IS NOT NULL THEN
        INSERT INTO public.rate_counters AS c (subject, window_start, hits)
        VALUES ('key:' || p_api_key, v_window, 1)
        ON CONFLICT (subject, window_start) DO UPDATE SET hits = c.hits + 1
        RETURNING hits INTO v_hits;
        IF v_hits = 1 THEN
            DELETE FROM public.rate_counters WHERE subject = 'key:' || p_api_key AND window_start < v_window;
        END IF;
        IF v_hits > v_key_per_minute THEN
            RAISE EXCEPTION 'rate limit exceeded: % requests per minute for this API key (plan %)', v_key_per_minute, v_plan
                USING ERRCODE = 'IA429', DETAIL = 'retry_after=' || greatest(1, 60 - extract(second FROM now())::integer);
        END IF;
    END IF;
END
$$;

CALL app.lock_down_functions();
