-- 008: tenant isolation enforced by PostgreSQL Row-Level Security.
--
-- Roles (cluster-wide, NOLOGIN groups; the names are part of the schema):
--   iaf_owner  owns every table and function. Nobody logs in as it. Not BYPASSRLS: with FORCE ROW
--              LEVEL SECURITY it obeys the tenant policies too, except for the few explicit
--              "definer" policies below that the pre-tenant and platform functions need.
--   iaf_app    the privileges of the application. The login role the service uses (its name and
--              password come from configuration; `iafactory migrate` creates it) is a member of
--              iaf_app and nothing else: no superuser, no BYPASSRLS, owner of nothing.
--
-- Fail-closed: app.current_tenant_id() is NULL when no tenant is set (or after a transaction
-- that set one ended: the setting then reads back as ''), and `tenant_id = NULL` is never true,
-- so every tenant table shows zero rows and refuses every write.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iaf_owner') THEN
        CREATE ROLE iaf_owner NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iaf_app') THEN
        CREATE ROLE iaf_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS platform;

-- The current tenant, or NULL. STABLE so that `tenant_id = (SELECT app.current_tenant_id())` is
-- evaluated once per statement and the planner can use (tenant_id, ...) indexes.
CREATE OR REPLACE FUNCTION app.current_tenant_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('app.tenant_id', true), '')::uuid $$;

CREATE OR REPLACE FUNCTION app.current_user_id() RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('app.user_id', true), '')::integer $$;

-- Ownership, RLS and the tenant policy on every table that has tenant_id (found in the catalog,
-- so nothing is forgotten), and on tenants itself.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
        WHERE c.relkind IN ('r', 'p') AND c.relname <> 'schema_migrations'
    LOOP
        EXECUTE format('ALTER TABLE public.%I OWNER TO iaf_owner', t.relname);
    END LOOP;

    FOR t IN
        SELECT c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p')
    LOOP
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t.relname);
        EXECUTE format('ALTER TABLE public.%I FORCE ROW LEVEL SECURITY', t.relname);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON public.%I', t.relname);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON public.%I AS PERMISSIVE FOR ALL TO PUBLIC '
            'USING (tenant_id = (SELECT app.current_tenant_id())) '
            'WITH CHECK (tenant_id = (SELECT app.current_tenant_id()))', t.relname);
        -- New rows default to the transaction's tenant; with none set the default is NULL and
        -- NOT NULL refuses the row. (Replaces 007's system-default on the old tables.)
        EXECUTE format('ALTER TABLE public.%I ALTER COLUMN tenant_id SET DEFAULT app.current_tenant_id()', t.relname);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON public.%I TO iaf_app', t.relname);
    END LOOP;
END
$$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_self ON tenants;
CREATE POLICY tenant_self ON tenants AS PERMISSIVE FOR ALL TO PUBLIC
    USING (id = (SELECT app.current_tenant_id()))
    WITH CHECK (id = (SELECT app.current_tenant_id()));

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
-- A user sees their own row and the members of the current tenant; never the whole user base.
DROP POLICY IF EXISTS users_self_or_colleague ON users;
CREATE POLICY users_self_or_colleague ON users AS PERMISSIVE FOR SELECT TO iaf_app
    USING (id = (SELECT app.current_user_id())
           OR EXISTS (SELECT 1 FROM tenant_users tu
                      WHERE tu.user_id = users.id AND tu.tenant_id = (SELECT app.current_tenant_id())));
DROP POLICY IF EXISTS users_self_update ON users;
CREATE POLICY users_self_update ON users AS PERMISSIVE FOR UPDATE TO iaf_app
    USING (id = (SELECT app.current_user_id()))
    WITH CHECK (id = (SELECT app.current_user_id()));

-- Definer policies: what the SECURITY DEFINER functions below (owned by iaf_owner) may see.
DROP POLICY IF EXISTS definer_all ON tenants;
CREATE POLICY definer_all ON tenants AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS definer_all ON users;
CREATE POLICY definer_all ON users AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS definer_all ON tenant_users;
CREATE POLICY definer_all ON tenant_users AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS definer_read ON api_keys;
CREATE POLICY definer_read ON api_keys AS PERMISSIVE FOR SELECT TO iaf_owner USING (true);

-- The old tables no longer default to system-default: a row without a tenant is refused.
-- (Done in the loop above: tenant_id now defaults to the transaction's tenant.)

-- Least privilege for the application.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public, app TO iaf_app;
REVOKE ALL ON SCHEMA platform FROM PUBLIC;
GRANT USAGE ON SCHEMA platform TO iaf_app;
REVOKE INSERT, DELETE, TRUNCATE ON tenants FROM iaf_app;
GRANT SELECT ON tenants TO iaf_app;
-- A tenant edits its name, contact and settings; region, plan and status are the platform's.
GRANT UPDATE (name, admin_email, admin_phone, settings) ON tenants TO iaf_app;
GRANT SELECT (id, email, name, is_active, is_platform_admin, last_login_at, created_at, updated_at) ON users TO iaf_app;
GRANT UPDATE (name, password_hash) ON users TO iaf_app;
-- The runners' tracking table is not the application's. It exists only when a runner applies this
-- file (plain `psql -f` has none); a runner that creates it later revokes the same itself.
DO $$
BEGIN
    IF to_regclass('public.schema_migrations') IS NOT NULL THEN
        REVOKE ALL ON public.schema_migrations FROM iaf_app;
    END IF;
END
$$;

ALTER SCHEMA app OWNER TO iaf_owner;
ALTER SCHEMA platform OWNER TO iaf_owner;

------------------------------------------------------------------------------------------------
-- Pre-tenant steps: narrow SECURITY DEFINER functions, fixed search_path, only what the step needs.
------------------------------------------------------------------------------------------------

-- Login: the password hash of one email (compared in the application with argon2).
CREATE OR REPLACE FUNCTION app.find_login(p_email text)
    RETURNS TABLE (user_id integer, password_hash text, is_active boolean, is_platform_admin boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT u.id, u.password_hash, u.is_active, u.is_platform_admin
        FROM public.users u WHERE lower(u.email) = lower(p_email)
    $$;

CREATE OR REPLACE FUNCTION app.record_login(p_user_id integer) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$ UPDATE public.users SET last_login_at = now() WHERE id = p_user_id $$;

-- Registration: creates the account, nothing else (no tenant, no role).
CREATE OR REPLACE FUNCTION app.register_user(p_email text, p_name text, p_password_hash text) RETURNS integer
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$
        INSERT INTO public.users (email, name, password_hash) VALUES (p_email, p_name, p_password_hash)
        RETURNING id
    $$;

-- The tenants a user belongs to, with their role: for login and tenant selection.
CREATE OR REPLACE FUNCTION app.user_memberships(p_user_id integer)
    RETURNS TABLE (tenant_id uuid, slug text, name text, role text, status text, trial_ends_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT t.id, t.slug::text, t.name::text, tu.role::text, t.status::text, t.trial_ends_at
        FROM public.tenant_users tu JOIN public.tenants t ON t.id = tu.tenant_id
        WHERE tu.user_id = p_user_id
        ORDER BY t.name
    $$;

-- API key lookup by its public prefix; the caller compares the HMAC of the presented key.
CREATE OR REPLACE FUNCTION app.find_api_key(p_prefix text)
    RETURNS TABLE (tenant_id uuid, id uuid, key_hash bytea, scope text, expires_at timestamptz,
                   revoked_at timestamptz, created_by integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT k.tenant_id, k.id, k.key_hash, k.scope::text, k.expires_at, k.revoked_at, k.created_by
        FROM public.api_keys k WHERE k.prefix = p_prefix
    $$;

------------------------------------------------------------------------------------------------
-- Platform administration: definer functions, never the application role with RLS switched off.
-- Callable by an operator's own login (the admin URL of the CLI), or by the application on behalf
-- of a user flagged is_platform_admin (app.user_id).
------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION app.assert_platform_operator() RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                   JOIN pg_catalog.pg_roles r ON r.oid = m.member
                   WHERE r.rolname = session_user AND m.roleid = 'iaf_app'::regrole) THEN
        RETURN;  -- an operator's login, not the application's
    END IF;
    IF EXISTS (SELECT 1 FROM public.users
               WHERE id = app.current_user_id() AND is_platform_admin AND is_active) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'platform administrators only' USING ERRCODE = 'IA403';
END
$$;

CREATE OR REPLACE FUNCTION platform.create_tenant(
    p_name text, p_slug text, p_region text, p_plan text, p_status text, p_admin_email text,
    p_admin_phone text, p_settings jsonb, p_metadata jsonb, p_trial_ends_at timestamptz)
    RETURNS SETOF public.tenants
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        INSERT INTO public.tenants (name, slug, region, plan, status, admin_email, admin_phone,
                                    settings, metadata, trial_ends_at)
        VALUES (p_name, p_slug, p_region, p_plan, p_status, p_admin_email, p_admin_phone,
                coalesce(p_settings, '{}'::jsonb), coalesce(p_metadata, '{}'::jsonb), p_trial_ends_at)
        RETURNING *;
END
$$;

-- Keyset pagination on (created_at, id).
CREATE OR REPLACE FUNCTION platform.list_tenants(
    p_region text DEFAULT NULL, p_plan text DEFAULT NULL, p_status text DEFAULT NULL,
    p_limit integer DEFAULT 100, p_after_created timestamptz DEFAULT NULL, p_after_id uuid DEFAULT NULL)
    RETURNS SETOF public.tenants
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        SELECT * FROM public.tenants t
        WHERE (p_region IS NULL OR t.region = p_region)
          AND (p_plan IS NULL OR t.plan = p_plan)
          AND (p_status IS NULL OR t.status = p_status)
          AND (p_after_created IS NULL OR (t.created_at, t.id) > (p_after_created, p_after_id))
        ORDER BY t.created_at, t.id
        LIMIT least(greatest(coalesce(p_limit, 100), 1), 1000);
END
$$;

CREATE OR REPLACE FUNCTION platform.get_tenant(p_id uuid DEFAULT NULL, p_slug text DEFAULT NULL)
    RETURNS SETOF public.tenants
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY SELECT * FROM public.tenants t WHERE t.id = p_id OR t.slug = p_slug;
END
$$;

-- Allowed status transitions (a cancelled tenant stays cancelled: its data is kept until erased).
CREATE OR REPLACE FUNCTION app.status_transition_allowed(p_from text, p_to text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT p_from = p_to OR (p_from, p_to) IN (
            ('trial', 'active'), ('trial', 'suspended'), ('trial', 'cancelled'),
            ('active', 'suspended'), ('active', 'cancelled'),
            ('suspended', 'active'), ('suspended', 'cancelled'))
    $$;

CREATE OR REPLACE FUNCTION platform.update_tenant(p_id uuid, p_plan text DEFAULT NULL, p_status text DEFAULT NULL)
    RETURNS SETOF public.tenants
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_current text;
BEGIN
    PERFORM app.assert_platform_operator();
    SELECT status INTO v_current FROM public.tenants WHERE id = p_id FOR UPDATE;
    IF FOUND AND p_status IS NOT NULL AND NOT app.status_transition_allowed(v_current, p_status) THEN
        RAISE EXCEPTION 'a % tenant cannot become %', v_current, p_status USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY
        UPDATE public.tenants t
        SET plan = coalesce(p_plan, t.plan), status = coalesce(p_status, t.status)
        WHERE t.id = p_id
        RETURNING *;
END
$$;

-- Adds (or re-roles) a member, creating the user when the email is new.
CREATE OR REPLACE FUNCTION platform.add_member(
    p_tenant_id uuid, p_email text, p_role text, p_name text DEFAULT '', p_password_hash text DEFAULT NULL)
    RETURNS TABLE (user_id integer, email text, user_created boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_user public.users%ROWTYPE;
    v_created boolean := false;
BEGIN
    PERFORM app.assert_platform_operator();
    SELECT * INTO v_user FROM public.users u WHERE lower(u.email) = lower(p_email);
    IF NOT FOUND THEN
        INSERT INTO public.users (email, name, password_hash) VALUES (p_email, coalesce(p_name, ''), p_password_hash)
        RETURNING * INTO v_user;
        v_created := true;
    ELSIF p_password_hash IS NOT NULL THEN
        UPDATE public.users u SET password_hash = p_password_hash WHERE u.id = v_user.id;
    END IF;
    INSERT INTO public.tenant_users (tenant_id, user_id, role) VALUES (p_tenant_id, v_user.id, p_role)
    ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = EXCLUDED.role;
    RETURN QUERY SELECT v_user.id, v_user.email::text, v_created;
END
$$;

-- Every function in app and platform: owned by iaf_owner, executable by the application only.
-- Later migrations that add functions end with CALL app.lock_down_functions().
CREATE OR REPLACE PROCEDURE app.lock_down_functions()
    LANGUAGE plpgsql AS $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig, p.prokind FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN ('app', 'platform')
    LOOP
        IF f.prokind = 'p' THEN
            EXECUTE format('ALTER PROCEDURE %s OWNER TO iaf_owner', f.sig);
            EXECUTE format('REVOKE ALL ON PROCEDURE %s FROM PUBLIC', f.sig);
        ELSE
            EXECUTE format('ALTER FUNCTION %s OWNER TO iaf_owner', f.sig);
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO iaf_app', f.sig);
        END IF;
    END LOOP;
END
$$;

CALL app.lock_down_functions();
