-- 020: functions, triggers and tenant slugs that keep working when the tables are distributed
-- by tenant (Citus: `iafactory citus distribute`), and that route each request to one tenant.
--
-- The rules (tests/test_distribution_rules.py checks each of them in the catalog):
--   * every statement on a tenant table names its tenant: `tenant_id = <variable>` (a definer
--     function first copies app.current_tenant_id() into a variable). A distributed planner
--     routes on that equality; it cannot route on a function call, nor on the row policy;
--   * plpgsql, not SQL-language, for functions that read tables (a SQL function's parameters
--     reach the distributed planner as unresolved parameters);
--   * no INSERT ... SELECT into a table with row security (Citus turns it into a COPY, refused);
--   * a trigger function learns its table's name from its first argument: on a shard,
--     TG_TABLE_NAME is the shard's name (tenant_users_102362);
--   * no non-IMMUTABLE function inside CASE/COALESCE of an UPDATE;
--   * no function returns (SETOF) a table's row type: converting the table drops such functions.
--   * tenants.slug is unique through a registry table (tenant_slugs), not a unique index on
--     tenants: a table distributed by id cannot enforce a unique key without id.

------------------------------------------------------------------------------------------------
-- Tenant slugs: one row per slug ever given to a tenant. tenants(slug, id) references it, so two
-- tenants can never share a slug. Global and small (a reference table once distributed).
------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS tenant_slugs (
    slug   varchar(100) PRIMARY KEY,
    tenant uuid NOT NULL,
    CONSTRAINT tenant_slugs_slug_tenant_key UNIQUE (slug, tenant)
);
ALTER TABLE tenant_slugs OWNER TO iaf_owner;
REVOKE ALL ON tenant_slugs FROM PUBLIC;  -- only definer functions and the trigger below touch it

INSERT INTO tenant_slugs (slug, tenant) SELECT slug, id FROM tenants ON CONFLICT DO NOTHING;

-- Registers the slug of a new (or renamed) tenant. platform.tenant_create registers it first:
-- on Citus this trigger runs on a shard, which may read the registry but not write to it.
CREATE OR REPLACE FUNCTION app.register_tenant_slug() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.tenant_slugs s WHERE s.slug = NEW.slug AND s.tenant = NEW.id) THEN
        INSERT INTO public.tenant_slugs (slug, tenant) VALUES (NEW.slug, NEW.id);
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER tenants_register_slug BEFORE INSERT OR UPDATE OF slug ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.register_tenant_slug();

------------------------------------------------------------------------------------------------
-- Platform functions on tenants return a type of their own, not the table's row type.
-- New names: 008's functions (same arguments, other return type) cannot be replaced in place.
------------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF to_regtype('platform.tenant_record') IS NULL THEN
        CREATE TYPE platform.tenant_record AS (
            id            uuid,
            name          varchar(255),
            slug          varchar(100),
            region        varchar(2),
            plan          varchar(50),
            status        varchar(50),
            admin_email   varchar(255),
            admin_phone   varchar(50),
            settings      jsonb,
            metadata      jsonb,
            created_at    timestamptz,
            updated_at    timestamptz,
            trial_ends_at timestamptz);
    END IF;
END
$$;
ALTER TYPE platform.tenant_record OWNER TO iaf_owner;

DROP FUNCTION IF EXISTS platform.create_tenant(text, text, text, text, text, text, text, jsonb, jsonb, timestamptz);
DROP FUNCTION IF EXISTS platform.list_tenants(text, text, text, integer, timestamptz, uuid);
DROP FUNCTION IF EXISTS platform.get_tenant(uuid, text);
DROP FUNCTION IF EXISTS platform.update_tenant(uuid, text, text);
DROP FUNCTION IF EXISTS platform.set_tenant_limits(uuid, jsonb);

CREATE OR REPLACE FUNCTION platform.tenant_create(
    p_name text, p_slug text, p_region text, p_plan text, p_status text, p_admin_email text,
    p_admin_phone text, p_settings jsonb, p_metadata jsonb, p_trial_ends_at timestamptz)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id uuid := gen_random_uuid();
BEGIN
    PERFORM app.assert_platform_operator();
    INSERT INTO public.tenant_slugs (slug, tenant) VALUES (p_slug, v_id);  -- a taken slug: unique_violation
    RETURN QUERY
        INSERT INTO public.tenants (id, name, slug, region, plan, status, admin_email, admin_phone,
                                    settings, metadata, trial_ends_at)
        VALUES (v_id, p_name, p_slug, p_region, p_plan, p_status, p_admin_email, p_admin_phone,
                coalesce(p_settings, '{}'::jsonb), coalesce(p_metadata, '{}'::jsonb), p_trial_ends_at)
        RETURNING id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata,
                  created_at, updated_at, trial_ends_at;
END
$$;

-- Keyset pagination on (created_at, id). Reads every tenant: the platform's registry.
CREATE OR REPLACE FUNCTION platform.tenant_list(
    p_region text DEFAULT NULL, p_plan text DEFAULT NULL, p_status text DEFAULT NULL,
    p_limit integer DEFAULT 100, p_after_created timestamptz DEFAULT NULL, p_after_id uuid DEFAULT NULL)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        SELECT t.id, t.name, t.slug, t.region, t.plan, t.status, t.admin_email, t.admin_phone, t.settings,
               t.metadata, t.created_at, t.updated_at, t.trial_ends_at
        FROM public.tenants t
        WHERE (p_region IS NULL OR t.region = p_region)
          AND (p_plan IS NULL OR t.plan = p_plan)
          AND (p_status IS NULL OR t.status = p_status)
          AND (p_after_created IS NULL OR (t.created_at, t.id) > (p_after_created, p_after_id))
        ORDER BY t.created_at, t.id
        LIMIT least(greatest(coalesce(p_limit, 100), 1), 1000);
END
$$;

-- One tenant by id, or by slug through the registry (so that both read one tenant's row).
CREATE OR REPLACE FUNCTION platform.tenant_get(p_id uuid DEFAULT NULL, p_slug text DEFAULT NULL)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id uuid := p_id;
BEGIN
    PERFORM app.assert_platform_operator();
    IF v_id IS NULL THEN
        SELECT s.tenant INTO v_id FROM public.tenant_slugs s WHERE s.slug = p_slug;
    END IF;
    RETURN QUERY
        SELECT t.id, t.name, t.slug, t.region, t.plan, t.status, t.admin_email, t.admin_phone, t.settings,
               t.metadata, t.created_at, t.updated_at, t.trial_ends_at
        FROM public.tenants t
        WHERE t.id = v_id AND (p_id IS NOT NULL OR t.slug = p_slug);
END
$$;

CREATE OR REPLACE FUNCTION platform.tenant_update(p_id uuid, p_plan text DEFAULT NULL, p_status text DEFAULT NULL)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_current text;
BEGIN
    PERFORM app.assert_platform_operator();
    SELECT t.status INTO v_current FROM public.tenants t WHERE t.id = p_id FOR UPDATE;
    IF FOUND AND p_status IS NOT NULL AND NOT app.status_transition_allowed(v_current, p_status) THEN
        RAISE EXCEPTION 'a % tenant cannot become %', v_current, p_status USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY
        UPDATE public.tenants t
        SET plan = coalesce(p_plan, t.plan), status = coalesce(p_status, t.status)
        WHERE t.id = p_id
        RETURNING t.id, t.name, t.slug, t.region, t.plan, t.status, t.admin_email, t.admin_phone, t.settings,
                  t.metadata, t.created_at, t.updated_at, t.trial_ends_at;
END
$$;

CREATE OR REPLACE FUNCTION platform.tenant_set_limits(p_id uuid, p_limits jsonb)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    IF EXISTS (SELECT 1 FROM jsonb_each(coalesce(p_limits, '{}'::jsonb)) e
               WHERE e.key NOT IN ('requests_per_minute', 'key_requests_per_minute', 'max_members',
                                   'max_api_keys', 'max_kb_bytes', 'monthly_credits')
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

------------------------------------------------------------------------------------------------
-- Pre-tenant steps (008, 009): the same answers, in plpgsql.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.find_login(p_email text)
    RETURNS TABLE (user_id integer, password_hash text, is_active boolean, is_platform_admin boolean)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT u.id, u.password_hash, u.is_active, u.is_platform_admin
        FROM public.users u WHERE lower(u.email) = lower(p_email);
END
$$;

CREATE OR REPLACE FUNCTION app.record_login(p_user_id integer) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    UPDATE public.users SET last_login_at = now() WHERE id = p_user_id;
END
$$;

CREATE OR REPLACE FUNCTION app.register_user(p_email text, p_name text, p_password_hash text) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id integer;
BEGIN
    INSERT INTO public.users (email, name, password_hash) VALUES (p_email, p_name, p_password_hash)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION app.find_user_id(p_email text) RETURNS integer
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id integer;
BEGIN
    SELECT u.id INTO v_id FROM public.users u WHERE lower(u.email) = lower(p_email);
    RETURN v_id;
END
$$;

-- The tenants one user belongs to: across tenants by nature (sign-in, tenant selection).
CREATE OR REPLACE FUNCTION app.user_memberships(p_user_id integer)
    RETURNS TABLE (tenant_id uuid, slug text, name text, role text, status text, trial_ends_at timestamptz)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT t.id, t.slug::text, t.name::text, tu.role::text, t.status::text, t.trial_ends_at
        FROM public.tenant_users tu JOIN public.tenants t ON t.id = tu.tenant_id
        WHERE tu.user_id = p_user_id
        ORDER BY t.name;
END
$$;

-- Unused since 009 (app.authenticate_api_key replaced it).
DROP FUNCTION IF EXISTS app.find_api_key(text);

-- The key's tenant is what this finds (a read across tenants, by the key's public prefix); the
-- last-use write then names that tenant.
CREATE OR REPLACE FUNCTION app.authenticate_api_key(p_prefix text)
    RETURNS TABLE (tenant_id uuid, id uuid, key_hash bytea, scope text, expires_at timestamptz,
                   revoked_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT a.tenant_id, a.id, a.key_hash, a.scope::text AS scope, a.expires_at, a.revoked_at, a.last_used_at
        FROM public.api_keys a WHERE a.prefix = p_prefix
    LOOP
        -- Last use recorded at most once a minute: a write per request would cost more than it tells.
        IF k.revoked_at IS NULL AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute') THEN
            UPDATE public.api_keys a SET last_used_at = now() WHERE a.tenant_id = k.tenant_id AND a.id = k.id;
        END IF;
        tenant_id := k.tenant_id; id := k.id; key_hash := k.key_hash; scope := k.scope;
        expires_at := k.expires_at; revoked_at := k.revoked_at;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The members of the transaction's tenant with their email and name (a user may otherwise read
-- only their own row of users: a policy cannot look at tenant_users from a shard of users).
CREATE OR REPLACE FUNCTION app.tenant_members(p_user_id integer DEFAULT NULL)
    RETURNS TABLE (user_id integer, email text, name text, role text, created_at timestamptz)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_tenant uuid := app.current_tenant_id();
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- no tenant, no members (fail closed)
    END IF;
    RETURN QUERY
        SELECT tu.user_id, u.email::text, u.name::text, tu.role::text, tu.created_at
        FROM public.tenant_users tu JOIN public.users u ON u.id = tu.user_id
        WHERE tu.tenant_id = v_tenant AND (p_user_id IS NULL OR tu.user_id = p_user_id)
        ORDER BY tu.created_at, tu.user_id;
END
$$;

-- Adds a registered user to the transaction's tenant, and answers what the members list shows.
-- One function, so that the new row is written and read by the same role: on Citus a transaction
-- may not read, as iaf_owner, shard rows it changed as the application (and vice versa).
-- outcome: 'added', 'unknown' (no account with that email) or 'member' (already one).
CREATE OR REPLACE FUNCTION app.add_tenant_member(p_email text, p_role text)
    RETURNS TABLE (outcome text, user_id integer, email text, name text, role text, created_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_tenant uuid := app.current_tenant_id();
    u record;
    v_created timestamptz;
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'no tenant' USING ERRCODE = 'IA403';
    END IF;
    SELECT x.id, x.email::text AS email, x.name::text AS name INTO u
      FROM public.users x WHERE lower(x.email) = lower(p_email);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::integer, NULL::text, NULL::text, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO public.tenant_users AS tu (tenant_id, user_id, role) VALUES (v_tenant, u.id, p_role)
    ON CONFLICT ON CONSTRAINT tenant_users_pkey DO NOTHING
    RETURNING tu.created_at INTO v_created;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'member'::text, u.id, u.email, u.name, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'added'::text, u.id, u.email, u.name, p_role, v_created;
END
$$;

------------------------------------------------------------------------------------------------
-- The per-request gate: one plain join per kind of credential, each table restricted to the
-- transaction's tenant by an explicit equality (no outer join on a constant condition).
------------------------------------------------------------------------------------------------
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

------------------------------------------------------------------------------------------------
-- Plans, credits, audit (010).
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.tenant_limits(p_tenant uuid)
    RETURNS TABLE (plan text, requests_per_minute integer, key_requests_per_minute integer,
                   max_members integer, max_api_keys integer, max_kb_bytes bigint, monthly_credits bigint)
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
               coalesce((t.settings->'limits'->>'monthly_credits')::bigint, p.monthly_credits)
        FROM public.tenants t JOIN public.plan_limits p ON p.plan = t.plan
        WHERE t.id = p_tenant;
END
$$;

-- Count and storage limits. TG_ARGV[0]: the table the trigger is on.
CREATE OR REPLACE FUNCTION app.enforce_plan_limit() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_table text := TG_ARGV[0];
    v_limits record;
    v_used bigint;
    v_max bigint;
    v_name text;
BEGIN
    IF app.bulk_operation() THEN
        RETURN NEW;
    END IF;
    SELECT * INTO v_limits FROM app.tenant_limits(NEW.tenant_id);
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(v_table || ':' || NEW.tenant_id, 0));
    IF v_table = 'tenant_users' THEN
        v_name := 'max_members';
        v_max := v_limits.max_members;
        SELECT count(*) + 1 INTO v_used FROM public.tenant_users WHERE tenant_id = NEW.tenant_id;
    ELSIF v_table = 'api_keys' THEN
        v_name := 'max_api_keys';
        v_max := v_limits.max_api_keys;
        SELECT count(*) + 1 INTO v_used FROM public.api_keys WHERE tenant_id = NEW.tenant_id AND revoked_at IS NULL;
    ELSIF v_table = 'knowledge_base' THEN
        v_name := 'max_kb_bytes';
        v_max := v_limits.max_kb_bytes;
        SELECT coalesce(sum(octet_length(content)), 0) + octet_length(NEW.content)
               - CASE WHEN TG_OP = 'UPDATE' THEN octet_length(OLD.content) ELSE 0 END
          INTO v_used FROM public.knowledge_base WHERE tenant_id = NEW.tenant_id;
    ELSE
        RAISE EXCEPTION 'app.enforce_plan_limit() needs its table''s name as argument, got %', v_table;
    END IF;
    IF v_used > v_max THEN
        RAISE EXCEPTION 'plan limit reached: % = % (plan %)', v_name, v_max, v_limits.plan
            USING ERRCODE = 'IA403', DETAIL = 'limit=' || v_name;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION app.debit_credits(p_amount bigint, p_reason text, p_key text)
    RETURNS TABLE (transaction_id uuid, balance bigint, duplicate boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_tenant uuid := app.current_tenant_id();
BEGIN
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'no tenant' USING ERRCODE = 'IA403';
    END IF;
    IF p_amount <= 0 THEN
        RAISE EXCEPTION 'a debit is a positive amount' USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY SELECT * FROM internal.apply_credit(v_tenant, 'debit', -p_amount, p_reason, p_key,
                                                     app.current_user_id());
END
$$;

-- The monthly plan grant of one tenant (012), its limits read without a LATERAL call over
-- tenant rows (which a distributed planner refuses).
CREATE OR REPLACE FUNCTION platform.grant_monthly_to(p_tenant uuid, p_month date DEFAULT current_date)
    RETURNS TABLE (tenant_id uuid, slug text, credits bigint, granted boolean, balance bigint, currency text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    t record;
    v_credits bigint;
    v_granted boolean := false;
    v_balance bigint;
    v_currency text;
BEGIN
    PERFORM app.assert_platform_operator();
    SELECT tn.id, tn.slug::text AS slug, tn.status, tn.region INTO t FROM public.tenants tn WHERE tn.id = p_tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no tenant %', p_tenant USING ERRCODE = 'IA404';
    END IF;
    SELECT l.monthly_credits INTO v_credits FROM app.tenant_limits(p_tenant) l;
    IF t.status IN ('active', 'trial') AND v_credits > 0 THEN
        SELECT NOT r.duplicate INTO v_granted FROM internal.apply_credit(
            p_tenant, 'grant', v_credits, 'monthly plan grant ' || to_char(p_month, 'YYYY-MM'),
            'monthly:' || to_char(p_month, 'YYYY-MM'), NULL) r;
    END IF;
    SELECT a.credit_balance, a.currency::text INTO v_balance, v_currency
      FROM public.billing_accounts a WHERE a.tenant_id = p_tenant;
    RETURN QUERY SELECT p_tenant, t.slug, v_credits, v_granted, coalesce(v_balance, 0::bigint),
                        coalesce(v_currency, app.region_currency(t.region));
END
$$;

-- Every tenant's: the tenants first (a read of the registry), then one tenant at a time.
CREATE OR REPLACE FUNCTION platform.grant_monthly(p_month date DEFAULT current_date)
    RETURNS TABLE (tenant_id uuid, slug text, credits bigint, granted boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_id uuid;
    v_credits bigint;
BEGIN
    PERFORM app.assert_platform_operator();
    FOR v_id IN
        SELECT tn.id FROM public.tenants tn WHERE tn.status IN ('active', 'trial') ORDER BY tn.created_at, tn.id
    LOOP
        SELECT l.monthly_credits INTO v_credits FROM app.tenant_limits(v_id) l;
        CONTINUE WHEN coalesce(v_credits, 0) <= 0;
        RETURN QUERY SELECT g.tenant_id, g.slug, g.credits, g.granted FROM platform.grant_monthly_to(v_id, p_month) g;
    END LOOP;
END
$$;

-- Billable actions. TG_ARGV[0]: the table; TG_ARGV[1]: the action (a row of billable_actions).
CREATE OR REPLACE FUNCTION app.bill_action() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_table text := TG_ARGV[0];
    v_action text := TG_ARGV[1];
    v_cost bigint;
BEGIN
    IF app.bulk_operation() THEN
        RETURN NEW;
    END IF;
    SELECT credits INTO v_cost FROM public.billable_actions WHERE action = v_action;
    IF v_cost IS NOT NULL THEN
        PERFORM app.debit_credits(v_cost, v_action || ' ' || NEW.id, v_table || ':' || NEW.id);
    END IF;
    RETURN NEW;
END
$$;

-- Events recorded by the database itself. TG_ARGV[0]: the table the trigger is on.
CREATE OR REPLACE FUNCTION app.audit_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_table text := TG_ARGV[0];
    v_action text;
    v_tenant uuid;
    v_target text;
    v_details jsonb := '{}'::jsonb;
BEGIN
    IF app.bulk_operation() THEN
        RETURN NULL;
    END IF;
    IF v_table = 'tenant_users' THEN
        IF TG_OP = 'DELETE' THEN
            v_tenant := OLD.tenant_id;
            v_target := OLD.user_id::text;
            v_action := 'member.removed'; v_details := jsonb_build_object('role', OLD.role);
        ELSE
            v_tenant := NEW.tenant_id;
            v_target := NEW.user_id::text;
            IF TG_OP = 'INSERT' THEN
                v_action := 'member.added'; v_details := jsonb_build_object('role', NEW.role);
            ELSIF NEW.role IS DISTINCT FROM OLD.role THEN
                v_action := 'member.role_changed'; v_details := jsonb_build_object('from', OLD.role, 'to', NEW.role);
            END IF;
        END IF;
    ELSIF v_table = 'api_keys' THEN
        v_tenant := NEW.tenant_id;
        v_target := NEW.id::text;
        v_details := jsonb_build_object('name', NEW.name, 'prefix', NEW.prefix, 'scope', NEW.scope);
        IF TG_OP = 'INSERT' THEN
            v_action := 'api_key.created';
        ELSIF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
            v_action := 'api_key.revoked';
        END IF;
    ELSIF v_table = 'tenants' THEN
        v_tenant := NEW.id;
        v_target := NEW.id::text;
        IF NEW.status IS DISTINCT FROM OLD.status THEN
            INSERT INTO public.audit_events (tenant_id, action, target_type, target_id, details)
            VALUES (v_tenant, 'tenant.status_changed', 'tenant', v_target,
                    jsonb_build_object('from', OLD.status, 'to', NEW.status));
        END IF;
        IF NEW.plan IS DISTINCT FROM OLD.plan THEN
            INSERT INTO public.audit_events (tenant_id, action, target_type, target_id, details)
            VALUES (v_tenant, 'tenant.plan_changed', 'tenant', v_target,
                    jsonb_build_object('from', OLD.plan, 'to', NEW.plan));
        END IF;
        IF (NEW.name, NEW.settings, NEW.admin_email, NEW.admin_phone)
           IS DISTINCT FROM (OLD.name, OLD.settings, OLD.admin_email, OLD.admin_phone) THEN
            v_action := 'tenant.settings_changed';
        END IF;
    ELSIF v_table = 'credit_transactions' THEN
        v_tenant := NEW.tenant_id;
        v_target := NEW.id::text;
        IF NEW.kind <> 'debit' THEN
            v_action := 'credits.' || NEW.kind;
            v_details := jsonb_build_object('amount', NEW.amount, 'reason', NEW.reason, 'balance_after', NEW.balance_after);
        END IF;
    ELSE
        RAISE EXCEPTION 'app.audit_change() needs its table''s name as argument, got %', v_table;
    END IF;
    IF v_action IS NOT NULL THEN
        INSERT INTO public.audit_events (tenant_id, action, target_type, target_id, details)
        VALUES (v_tenant, v_action, v_table, v_target, v_details);
    END IF;
    RETURN NULL;
END
$$;

-- Events the application reports (sign-in, tenant selection, exports), for a tenant that exists.
CREATE OR REPLACE FUNCTION app.record_event(p_tenant uuid, p_action text, p_user integer, p_details jsonb,
                                            p_ip text, p_request_id text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.tenants t WHERE t.id = p_tenant) THEN
        INSERT INTO public.audit_events (tenant_id, action, actor_user_id, target_type, target_id, details, ip, request_id)
        VALUES (p_tenant, p_action, p_user, 'user', p_user::text, coalesce(p_details, '{}'::jsonb),
                nullif(p_ip, '')::inet, nullif(p_request_id, ''));
    END IF;
END
$$;

-- The application may open a billing account (its contact fields), never with credits in it. 010
-- granted INSERT on the contact columns only; but a distributed INSERT reaches the shard with
-- every column's value, defaults included (credit_balance 0, created_at ...), which a
-- column-level grant refuses. So the whole row may be inserted, and this trigger keeps the rule.
CREATE OR REPLACE FUNCTION app.billing_account_opens_empty() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.credit_balance <> 0 AND app.is_application_session() THEN
        RAISE EXCEPTION 'a billing account opens with a zero balance: credits move through the ledger'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER billing_accounts_open_empty BEFORE INSERT ON billing_accounts
    FOR EACH ROW EXECUTE FUNCTION app.billing_account_opens_empty();
GRANT INSERT ON billing_accounts TO iaf_app;

------------------------------------------------------------------------------------------------
-- /metrics (016): the queue's size across tenants, in plpgsql.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.knowledge_job_stats()
    RETURNS TABLE (pending bigint, runnable bigint, oldest_pending_age_seconds double precision)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT count(*),
               count(*) FILTER (WHERE j.run_after <= now()),
               coalesce(extract(epoch FROM now() - min(j.created_at))::double precision, 0)
        FROM public.knowledge_jobs j
        WHERE j.status = 'queued';
END
$$;

------------------------------------------------------------------------------------------------
-- The indexing queue (011, leases of 013). FOR UPDATE SKIP LOCKED works on a distributed table
-- only within one tenant (one shard): first the tenants that have a runnable job, the one with the
-- longest-waiting job first (a read of every shard, without locks), then the claim within one
-- tenant, moving on to the next when another worker holds all of this one's runnable jobs. The
-- same order as before: the oldest runnable job first. The lease token is made before the
-- UPDATE: a distributed UPDATE refuses a volatile function (gen_random_uuid) in its SET list.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.claim_knowledge_job(p_lease_seconds integer, p_worker text)
    RETURNS TABLE (tenant_id uuid, id bigint, document_id bigint, kind text, attempts integer, lease_token uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_tenants uuid[];
    v_tenant uuid;
    v_id bigint;
    v_token uuid := gen_random_uuid();
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'a lease is at least one second' USING ERRCODE = 'IA409';
    END IF;
    SELECT array_agg(due.tenant_id ORDER BY due.oldest, due.tenant_id) INTO v_tenants
      FROM (SELECT q.tenant_id, min(q.run_after) AS oldest FROM public.knowledge_jobs q
            WHERE (q.status = 'queued' AND q.run_after <= now())
               OR (q.status = 'running' AND coalesce(q.lease_until, q.locked_at + interval '5 minutes') < now())
            GROUP BY q.tenant_id
            ORDER BY 2, 1
            LIMIT 100) due;
    FOREACH v_tenant IN ARRAY coalesce(v_tenants, '{}') LOOP
        -- Two statements, not UPDATE ... FROM (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED): planned
        -- with the tenant's rows outside, that subquery runs again for each row and claims them all.
        SELECT q.id INTO v_id FROM public.knowledge_jobs q
         WHERE q.tenant_id = v_tenant
           AND ((q.status = 'queued' AND q.run_after <= now())
                OR (q.status = 'running' AND coalesce(q.lease_until, q.locked_at + interval '5 minutes') < now()))
         ORDER BY q.run_after, q.id
         LIMIT 1
         FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            RETURN QUERY
                UPDATE public.knowledge_jobs j
                SET status = 'running', locked_at = now(), attempts = j.attempts + 1,
                    lease_until = now() + make_interval(secs => p_lease_seconds),
                    lease_token = v_token, worker = left(p_worker, 200)
                WHERE j.tenant_id = v_tenant AND j.id = v_id
                RETURNING j.tenant_id, j.id, j.document_id, j.kind::text, j.attempts, j.lease_token;
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- Expired idempotency keys (013), tenant by tenant for the same reason, at most p_limit in all.
CREATE OR REPLACE FUNCTION app.purge_idempotency_keys(p_limit integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_left integer := least(greatest(coalesce(p_limit, 1000), 1), 10000);
    v_tenants uuid[];
    v_tenant uuid;
    v_keys text[];
    v_deleted integer;
    v_total integer := 0;
BEGIN
    SELECT array_agg(expired.tenant_id ORDER BY expired.oldest, expired.tenant_id) INTO v_tenants
      FROM (SELECT k.tenant_id, min(k.expires_at) AS oldest FROM public.idempotency_keys k
            WHERE k.expires_at <= now() GROUP BY k.tenant_id) expired;
    FOREACH v_tenant IN ARRAY coalesce(v_tenants, '{}') LOOP
        SELECT array_agg(k.key) INTO v_keys FROM (
            SELECT x.key FROM public.idempotency_keys x
             WHERE x.tenant_id = v_tenant AND x.expires_at <= now()
             ORDER BY x.expires_at LIMIT v_left FOR UPDATE SKIP LOCKED) k;
        DELETE FROM public.idempotency_keys d WHERE d.tenant_id = v_tenant AND d.key = ANY (v_keys);
        GET DIAGNOSTICS v_deleted = ROW_COUNT;
        v_total := v_total + v_deleted;
        v_left := v_left - v_deleted;
        EXIT WHEN v_left <= 0;
    END LOOP;
    RETURN v_total;
END
$$;

------------------------------------------------------------------------------------------------
-- Users: a user reads their own row; colleagues come from app.tenant_members().
------------------------------------------------------------------------------------------------
DROP POLICY IF EXISTS users_self_or_colleague ON users;
DROP POLICY IF EXISTS users_self ON users;
CREATE POLICY users_self ON users AS PERMISSIVE FOR SELECT TO iaf_app
    USING (id = app.current_user_id());

------------------------------------------------------------------------------------------------
-- Triggers name their table in their first argument (a brief lock each, retried).
------------------------------------------------------------------------------------------------
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER tenant_users_plan_limit BEFORE INSERT ON public.tenant_users
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit('tenant_users')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER api_keys_plan_limit BEFORE INSERT ON public.api_keys
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit('api_keys')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER knowledge_base_plan_limit
    BEFORE INSERT OR UPDATE OF content ON public.knowledge_base
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit('knowledge_base')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER pme_analyses_bill AFTER INSERT ON public.pme_analyses
    FOR EACH ROW EXECUTE FUNCTION app.bill_action('pme_analyses', 'pme_analysis')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER voice_transcriptions_bill AFTER INSERT ON public.voice_transcriptions
    FOR EACH ROW EXECUTE FUNCTION app.bill_action('voice_transcriptions', 'voice_transcription')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER tenant_users_audit
    AFTER INSERT OR UPDATE OR DELETE ON public.tenant_users
    FOR EACH ROW EXECUTE FUNCTION app.audit_change('tenant_users')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER api_keys_audit AFTER INSERT OR UPDATE OF revoked_at ON public.api_keys
    FOR EACH ROW EXECUTE FUNCTION app.audit_change('api_keys')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER tenants_audit AFTER UPDATE ON public.tenants
    FOR EACH ROW EXECUTE FUNCTION app.audit_change('tenants')$$);
CALL app.run_ddl_briefly($$CREATE OR REPLACE TRIGGER credit_transactions_audit AFTER INSERT ON public.credit_transactions
    FOR EACH ROW EXECUTE FUNCTION app.audit_change('credit_transactions')$$);

------------------------------------------------------------------------------------------------
-- Slugs: the registry becomes the only guarantee of uniqueness (last: the brief locks on tenants).
------------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'public.tenants'::regclass
                   AND conname = 'tenants_slug_registered') THEN
        CALL app.run_ddl_briefly('ALTER TABLE public.tenants ADD CONSTRAINT tenants_slug_registered '
                                 'FOREIGN KEY (slug, id) REFERENCES public.tenant_slugs (slug, tenant)');
    END IF;
END
$$;
CALL app.run_ddl_briefly('ALTER TABLE public.tenants DROP CONSTRAINT IF EXISTS tenants_slug_key');

------------------------------------------------------------------------------------------------
-- For later migrations that create tables: on a database already distributed by
-- `iafactory citus distribute`, a new table must be distributed (or made a reference table)
-- before foreign keys to distributed tables can point from it. Nothing happens on plain
-- PostgreSQL, nor on Citus before the first `citus distribute` (which then takes the table too).
--     CREATE TABLE t (tenant_id uuid NOT NULL ..., PRIMARY KEY (tenant_id, ...));
--     CALL app.distribute_tenant_table('t');   -- or app.distribute_global_table('t')
--     ALTER TABLE t ADD CONSTRAINT ... FOREIGN KEY (tenant_id) REFERENCES tenants (id);
------------------------------------------------------------------------------------------------
CREATE OR REPLACE PROCEDURE app.distribute_tenant_table(tbl text)
    LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := format('public.%I', tbl)::regclass;
    todo boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN;  -- plain PostgreSQL
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $2)'
        INTO todo USING 'public.tenants'::regclass, rel;
    IF todo THEN
        EXECUTE 'SELECT create_distributed_table($1, ''tenant_id'', colocate_with => ''public.tenants'')' USING rel;
    END IF;
END
$$;

CREATE OR REPLACE PROCEDURE app.distribute_global_table(tbl text)
    LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := format('public.%I', tbl)::regclass;
    todo boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN;  -- plain PostgreSQL
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $2)'
        INTO todo USING 'public.tenants'::regclass, rel;
    IF todo THEN
        EXECUTE 'SELECT create_reference_table($1)' USING rel;
    END IF;
END
$$;

CALL app.lock_down_functions();
