-- 010: plans that govern the service, credits that cannot go negative, and the audit log.

-- Operator bulk work (tenant import and erasure) sets app.bulk_operation for its transaction to
-- bypass plan limits, billing and audit triggers. Only an operator's own login can: for the
-- application's login the flag means nothing.
CREATE OR REPLACE FUNCTION app.is_application_session() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                       JOIN pg_catalog.pg_roles r ON r.oid = m.member
                       WHERE r.rolname = session_user AND m.roleid = 'iaf_app'::regrole)
    $$;

CREATE OR REPLACE FUNCTION app.bulk_operation() RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT current_setting('app.bulk_operation', true) = 'on' AND NOT app.is_application_session() $$;

------------------------------------------------------------------------------------------------
-- Plans and limits. One row per plan; a tenant may override any limit in settings->'limits'.
------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS plan_limits (
    plan                    varchar(50) PRIMARY KEY,
    requests_per_minute     integer NOT NULL,   -- per tenant, all credentials together
    key_requests_per_minute integer NOT NULL,   -- per API key
    max_members             integer NOT NULL,
    max_api_keys            integer NOT NULL,
    max_kb_bytes            bigint  NOT NULL,   -- stored knowledge-base content
    monthly_credits         bigint  NOT NULL,
    CONSTRAINT plan_limits_plan_valid CHECK (plan IN ('free', 'pro', 'enterprise'))
);

INSERT INTO plan_limits VALUES
    ('free',        120,    60,    3,   2,     10485760,     100),
    ('pro',        1200,   600,   25,  10,   1073741824,    5000),
    ('enterprise', 12000, 6000,  500, 100,  53687091200,  100000)
ON CONFLICT (plan) DO NOTHING;

ALTER TABLE plan_limits OWNER TO iaf_owner;
REVOKE ALL ON plan_limits FROM PUBLIC;
GRANT SELECT ON plan_limits TO iaf_app;

-- The limits in force for a tenant: its plan's row, with per-tenant overrides applied. Dropped
-- first: 037 gives it another column, which CREATE OR REPLACE could not take back when every file
-- runs again (a runner adopting a database built with psql); 037 then makes it anew.
DROP FUNCTION IF EXISTS app.tenant_limits(uuid);
CREATE OR REPLACE FUNCTION app.tenant_limits(p_tenant uuid)
    RETURNS TABLE (plan text, requests_per_minute integer, key_requests_per_minute integer,
                   max_members integer, max_api_keys integer, max_kb_bytes bigint, monthly_credits bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
        SELECT t.plan::text,
               coalesce((t.settings->'limits'->>'requests_per_minute')::integer, p.requests_per_minute),
               coalesce((t.settings->'limits'->>'key_requests_per_minute')::integer, p.key_requests_per_minute),
               coalesce((t.settings->'limits'->>'max_members')::integer, p.max_members),
               coalesce((t.settings->'limits'->>'max_api_keys')::integer, p.max_api_keys),
               coalesce((t.settings->'limits'->>'max_kb_bytes')::bigint, p.max_kb_bytes),
               coalesce((t.settings->'limits'->>'monthly_credits')::bigint, p.monthly_credits)
        FROM public.tenants t JOIN public.plan_limits p ON p.plan = t.plan
        WHERE t.id = p_tenant
    $$;

-- Overrides are the platform's to set: a tenant owner editing settings cannot raise them.
CREATE OR REPLACE FUNCTION app.protect_limit_overrides() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.settings->'limits' IS DISTINCT FROM OLD.settings->'limits' THEN
        PERFORM app.assert_platform_operator();
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER tenants_protect_limits BEFORE UPDATE OF settings ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.protect_limit_overrides();

CREATE OR REPLACE FUNCTION platform.set_tenant_limits(p_id uuid, p_limits jsonb)
    RETURNS SETOF public.tenants
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
        RETURNING *;
END
$$;

------------------------------------------------------------------------------------------------
-- Rate limits shared by every worker: fixed one-minute windows in an UNLOGGED table (no WAL; a
-- crash forgets at most a minute of counts). app.rate_hit runs in its own short transaction,
-- before the request's, so the counter row is locked for microseconds, not for the request.
------------------------------------------------------------------------------------------------
CREATE UNLOGGED TABLE IF NOT EXISTS rate_counters (
    subject      text NOT NULL,          -- 'tenant:<uuid>' or 'key:<uuid>'
    window_start timestamptz NOT NULL,
    hits         integer NOT NULL,
    PRIMARY KEY (subject, window_start)
);
ALTER TABLE rate_counters OWNER TO iaf_owner;
REVOKE ALL ON rate_counters FROM PUBLIC;  -- only app.rate_hit (definer) touches it

CREATE OR REPLACE FUNCTION app.rate_hit(p_tenant uuid, p_api_key uuid) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_limits record;
    v_window timestamptz := date_trunc('minute', now());
    v_retry integer := greatest(1, 60 - extract(second FROM now())::integer);
    v_hits integer;
BEGIN
    SELECT * INTO v_limits FROM app.tenant_limits(p_tenant);
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
    IF v_hits > v_limits.requests_per_minute THEN
        RAISE EXCEPTION 'rate limit exceeded: % requests per minute for this tenant (plan %)',
            v_limits.requests_per_minute, v_limits.plan
            USING ERRCODE = 'IA429', DETAIL = 'retry_after=' || v_retry;
    END IF;
    IF p_api_key IS NOT NULL THEN
        INSERT INTO public.rate_counters AS c (subject, window_start, hits)
        VALUES ('key:' || p_api_key, v_window, 1)
        ON CONFLICT (subject, window_start) DO UPDATE SET hits = c.hits + 1
        RETURNING hits INTO v_hits;
        IF v_hits = 1 THEN
            DELETE FROM public.rate_counters WHERE subject = 'key:' || p_api_key AND window_start < v_window;
        END IF;
        IF v_hits > v_limits.key_requests_per_minute THEN
            RAISE EXCEPTION 'rate limit exceeded: % requests per minute for this API key (plan %)',
                v_limits.key_requests_per_minute, v_limits.plan
                USING ERRCODE = 'IA429', DETAIL = 'retry_after=' || v_retry;
        END IF;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Count and storage limits, enforced by the database for every path (API, CLI, definer
-- functions). A per-tenant advisory lock makes "count, then insert" safe under concurrency.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.enforce_plan_limit() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
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
    PERFORM pg_advisory_xact_lock(hashtextextended(TG_TABLE_NAME || ':' || NEW.tenant_id, 0));
    IF TG_TABLE_NAME = 'tenant_users' THEN
        v_name := 'max_members';
        v_max := v_limits.max_members;
        SELECT count(*) + 1 INTO v_used FROM public.tenant_users WHERE tenant_id = NEW.tenant_id;
    ELSIF TG_TABLE_NAME = 'api_keys' THEN
        v_name := 'max_api_keys';
        v_max := v_limits.max_api_keys;
        SELECT count(*) + 1 INTO v_used FROM public.api_keys WHERE tenant_id = NEW.tenant_id AND revoked_at IS NULL;
    ELSIF TG_TABLE_NAME = 'knowledge_base' THEN
        v_name := 'max_kb_bytes';
        v_max := v_limits.max_kb_bytes;
        SELECT coalesce(sum(octet_length(content)), 0) + octet_length(NEW.content)
               - CASE WHEN TG_OP = 'UPDATE' THEN octet_length(OLD.content) ELSE 0 END
          INTO v_used FROM public.knowledge_base WHERE tenant_id = NEW.tenant_id;
    END IF;
    IF v_used > v_max THEN
        RAISE EXCEPTION 'plan limit reached: % = % (plan %)', v_name, v_max, v_limits.plan
            USING ERRCODE = 'IA403', DETAIL = 'limit=' || v_name;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER tenant_users_plan_limit BEFORE INSERT ON tenant_users
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit();
CREATE OR REPLACE TRIGGER api_keys_plan_limit BEFORE INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit();
CREATE OR REPLACE TRIGGER knowledge_base_plan_limit BEFORE INSERT OR UPDATE OF content ON knowledge_base
    FOR EACH ROW EXECUTE FUNCTION app.enforce_plan_limit();

------------------------------------------------------------------------------------------------
-- Credits. billing_accounts.credit_balance always equals the sum of the tenant's ledger and is
-- never negative. Only the functions below write either: the application may edit a billing
-- account's contact fields and read the ledger, nothing more.
------------------------------------------------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS internal;
ALTER SCHEMA internal OWNER TO iaf_owner;
REVOKE ALL ON SCHEMA internal FROM PUBLIC;

REVOKE INSERT, UPDATE, DELETE ON billing_accounts FROM iaf_app;
GRANT INSERT (tenant_id, billing_name, billing_email, address, vat_number, currency) ON billing_accounts TO iaf_app;
GRANT UPDATE (billing_name, billing_email, address, vat_number, currency) ON billing_accounts TO iaf_app;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON credit_transactions FROM iaf_app;

DROP POLICY IF EXISTS definer_all ON billing_accounts;
CREATE POLICY definer_all ON billing_accounts AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS definer_all ON credit_transactions;
CREATE POLICY definer_all ON credit_transactions AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);

CREATE TABLE IF NOT EXISTS billable_actions (
    action  varchar(100) PRIMARY KEY,
    credits bigint NOT NULL CHECK (credits > 0)
);
INSERT INTO billable_actions VALUES ('pme_analysis', 10), ('voice_transcription', 5)
ON CONFLICT (action) DO NOTHING;
ALTER TABLE billable_actions OWNER TO iaf_owner;
REVOKE ALL ON billable_actions FROM PUBLIC;
GRANT SELECT ON billable_actions TO iaf_app;

-- The one path that changes a balance. Serialised per tenant by the account's row lock; the
-- idempotency key makes a retried operation a no-op that reports the original transaction.
CREATE OR REPLACE FUNCTION internal.apply_credit(
    p_tenant uuid, p_kind text, p_amount bigint, p_reason text, p_key text, p_actor integer)
    RETURNS TABLE (transaction_id uuid, balance bigint, duplicate boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_balance bigint;
    v_existing uuid;
    v_id uuid;
BEGIN
    IF p_amount = 0 THEN
        RAISE EXCEPTION 'amount must not be zero' USING ERRCODE = 'IA409';
    END IF;
    INSERT INTO public.billing_accounts (tenant_id) VALUES (p_tenant) ON CONFLICT (tenant_id) DO NOTHING;
    SELECT a.credit_balance INTO v_balance FROM public.billing_accounts a WHERE a.tenant_id = p_tenant FOR UPDATE;
    SELECT t.id INTO v_existing FROM public.credit_transactions t
    WHERE t.tenant_id = p_tenant AND t.idempotency_key = p_key;
    IF FOUND THEN
        RETURN QUERY SELECT v_existing, v_balance, true;
        RETURN;
    END IF;
    IF v_balance + p_amount < 0 THEN
        RAISE EXCEPTION 'insufficient credits: balance %, needed %', v_balance, -p_amount
            USING ERRCODE = 'IA402';
    END IF;
    UPDATE public.billing_accounts a SET credit_balance = a.credit_balance + p_amount
    WHERE a.tenant_id = p_tenant RETURNING a.credit_balance INTO v_balance;
    INSERT INTO public.credit_transactions (tenant_id, kind, amount, reason, idempotency_key, balance_after, created_by)
    VALUES (p_tenant, p_kind, p_amount, p_reason, p_key, v_balance, p_actor)
    RETURNING id INTO v_id;
    RETURN QUERY SELECT v_id, v_balance, false;
END
$$;
REVOKE ALL ON FUNCTION internal.apply_credit(uuid, text, bigint, text, text, integer) FROM PUBLIC;
ALTER FUNCTION internal.apply_credit(uuid, text, bigint, text, text, integer) OWNER TO iaf_owner;

-- A debit by the current tenant (the tenant comes from the transaction, never an argument).
CREATE OR REPLACE FUNCTION app.debit_credits(p_amount bigint, p_reason text, p_key text)
    RETURNS TABLE (transaction_id uuid, balance bigint, duplicate boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF app.current_tenant_id() IS NULL THEN
        RAISE EXCEPTION 'no tenant' USING ERRCODE = 'IA403';
    END IF;
    IF p_amount <= 0 THEN
        RAISE EXCEPTION 'a debit is a positive amount' USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY SELECT * FROM internal.apply_credit(app.current_tenant_id(), 'debit', -p_amount, p_reason, p_key,
                                                     app.current_user_id());
END
$$;

-- Platform administrators grant (or, with kind 'adjustment', correct) a tenant's credits.
CREATE OR REPLACE FUNCTION platform.grant_credits(p_tenant uuid, p_amount bigint, p_reason text, p_key text,
                                                  p_kind text DEFAULT 'grant')
    RETURNS TABLE (transaction_id uuid, balance bigint, duplicate boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    IF p_kind NOT IN ('grant', 'refund', 'adjustment') THEN
        RAISE EXCEPTION 'kind must be grant, refund or adjustment' USING ERRCODE = 'IA409';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.tenants WHERE id = p_tenant) THEN
        RAISE EXCEPTION 'no tenant %', p_tenant USING ERRCODE = 'IA404';
    END IF;
    RETURN QUERY SELECT * FROM internal.apply_credit(p_tenant, p_kind, p_amount, p_reason, p_key,
                                                     app.current_user_id());
END
$$;

-- The monthly plan grant: once per tenant per month however often it runs (idempotency key).
CREATE OR REPLACE FUNCTION platform.grant_monthly(p_month date DEFAULT current_date)
    RETURNS TABLE (tenant_id uuid, slug text, credits bigint, granted boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    t record;
    v_key text := 'monthly:' || to_char(p_month, 'YYYY-MM');
    v_dup boolean;
BEGIN
    PERFORM app.assert_platform_operator();
    FOR t IN
        SELECT tn.id, tn.slug::text AS slug, l.monthly_credits
        FROM public.tenants tn CROSS JOIN LATERAL app.tenant_limits(tn.id) l
        WHERE tn.status IN ('active', 'trial') AND l.monthly_credits > 0
        ORDER BY tn.created_at, tn.id
    LOOP
        SELECT r.duplicate INTO v_dup FROM internal.apply_credit(
            t.id, 'grant', t.monthly_credits, 'monthly plan grant ' || to_char(p_month, 'YYYY-MM'), v_key, NULL) r;
        RETURN QUERY SELECT t.id, t.slug, t.monthly_credits, NOT v_dup;
    END LOOP;
END
$$;

-- Billable actions debit credits in the same transaction as the action: no credits, no action.
CREATE OR REPLACE FUNCTION app.bill_action() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_cost bigint;
BEGIN
    IF app.bulk_operation() THEN
        RETURN NEW;
    END IF;
    SELECT credits INTO v_cost FROM public.billable_actions WHERE action = TG_ARGV[0];
    IF v_cost IS NOT NULL THEN
        PERFORM app.debit_credits(v_cost, TG_ARGV[0] || ' ' || NEW.id, TG_TABLE_NAME || ':' || NEW.id);
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER pme_analyses_bill AFTER INSERT ON pme_analyses
    FOR EACH ROW EXECUTE FUNCTION app.bill_action('pme_analysis');
CREATE OR REPLACE TRIGGER voice_transcriptions_bill AFTER INSERT ON voice_transcriptions
    FOR EACH ROW EXECUTE FUNCTION app.bill_action('voice_transcription');

------------------------------------------------------------------------------------------------
-- Audit log: per tenant, append-only for the application.
------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS audit_events (
    tenant_id     uuid NOT NULL DEFAULT app.current_tenant_id() REFERENCES tenants (id) ON DELETE RESTRICT,
    id            uuid NOT NULL DEFAULT gen_random_uuid(),
    action        varchar(100) NOT NULL,
    actor_user_id integer DEFAULT app.current_user_id(),
    actor_api_key uuid DEFAULT nullif(current_setting('app.api_key_id', true), '')::uuid,
    actor         text NOT NULL DEFAULT session_user,
    target_type   varchar(50),
    target_id     text,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb,
    ip            inet DEFAULT nullif(current_setting('app.client_ip', true), '')::inet,
    request_id    varchar(64) DEFAULT nullif(current_setting('app.request_id', true), ''),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX IF NOT EXISTS idx_audit_events_tenant_created ON audit_events (tenant_id, created_at DESC);
CREATE INDEX IF NOT EXISTS idx_audit_events_tenant_action ON audit_events (tenant_id, action, created_at DESC);
ALTER TABLE audit_events OWNER TO iaf_owner;
ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_events FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON audit_events;
CREATE POLICY tenant_isolation ON audit_events AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant_id = (SELECT app.current_tenant_id()))
    WITH CHECK (tenant_id = (SELECT app.current_tenant_id()));
DROP POLICY IF EXISTS definer_insert ON audit_events;
CREATE POLICY definer_insert ON audit_events AS PERMISSIVE FOR INSERT TO iaf_owner WITH CHECK (true);
REVOKE ALL ON audit_events FROM iaf_app;
GRANT SELECT, INSERT ON audit_events TO iaf_app;

-- Events recorded by the database itself, whichever path made the change.
CREATE OR REPLACE FUNCTION app.audit_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_action text;
    v_tenant uuid;
    v_target text;
    v_details jsonb := '{}'::jsonb;
BEGIN
    IF app.bulk_operation() THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'tenant_users' THEN
        v_tenant := coalesce(NEW.tenant_id, OLD.tenant_id);
        v_target := coalesce(NEW.user_id, OLD.user_id)::text;
        IF TG_OP = 'INSERT' THEN
            v_action := 'member.added'; v_details := jsonb_build_object('role', NEW.role);
        ELSIF TG_OP = 'DELETE' THEN
            v_action := 'member.removed'; v_details := jsonb_build_object('role', OLD.role);
        ELSIF NEW.role IS DISTINCT FROM OLD.role THEN
            v_action := 'member.role_changed'; v_details := jsonb_build_object('from', OLD.role, 'to', NEW.role);
        END IF;
    ELSIF TG_TABLE_NAME = 'api_keys' THEN
        v_tenant := NEW.tenant_id;
        v_target := NEW.id::text;
        v_details := jsonb_build_object('name', NEW.name, 'prefix', NEW.prefix, 'scope', NEW.scope);
        IF TG_OP = 'INSERT' THEN
            v_action := 'api_key.created';
        ELSIF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
            v_action := 'api_key.revoked';
        END IF;
    ELSIF TG_TABLE_NAME = 'tenants' THEN
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
    ELSIF TG_TABLE_NAME = 'credit_transactions' THEN
        v_tenant := NEW.tenant_id;
        v_target := NEW.id::text;
        IF NEW.kind <> 'debit' THEN
            v_action := 'credits.' || NEW.kind;
            v_details := jsonb_build_object('amount', NEW.amount, 'reason', NEW.reason, 'balance_after', NEW.balance_after);
        END IF;
    END IF;
    IF v_action IS NOT NULL THEN
        INSERT INTO public.audit_events (tenant_id, action, target_type, target_id, details)
        VALUES (v_tenant, v_action, TG_TABLE_NAME, v_target, v_details);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER tenant_users_audit AFTER INSERT OR UPDATE OR DELETE ON tenant_users
    FOR EACH ROW EXECUTE FUNCTION app.audit_change();
CREATE OR REPLACE TRIGGER api_keys_audit AFTER INSERT OR UPDATE OF revoked_at ON api_keys
    FOR EACH ROW EXECUTE FUNCTION app.audit_change();
CREATE OR REPLACE TRIGGER tenants_audit AFTER UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.audit_change();
CREATE OR REPLACE TRIGGER credit_transactions_audit AFTER INSERT ON credit_transactions
    FOR EACH ROW EXECUTE FUNCTION app.audit_change();

-- Events the application reports (sign-in, tenant selection, exports): recorded for a tenant
-- before a tenant transaction exists, hence a definer function. Append-only like the rest.
CREATE OR REPLACE FUNCTION app.record_event(p_tenant uuid, p_action text, p_user integer, p_details jsonb,
                                            p_ip text, p_request_id text) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$
        INSERT INTO public.audit_events (tenant_id, action, actor_user_id, target_type, target_id, details, ip, request_id)
        SELECT p_tenant, p_action, p_user, 'user', p_user::text, coalesce(p_details, '{}'::jsonb),
               nullif(p_ip, '')::inet, nullif(p_request_id, '')
        WHERE EXISTS (SELECT 1 FROM public.tenants WHERE id = p_tenant)
    $$;

-- Erasures outlive the erased tenant: what was erased, when and by whom, and nothing else.
CREATE TABLE IF NOT EXISTS tenant_erasures (
    erased_tenant uuid NOT NULL,
    slug          varchar(100) NOT NULL,
    erased_at     timestamptz NOT NULL DEFAULT now(),
    erased_by     text NOT NULL DEFAULT session_user,
    row_counts    jsonb NOT NULL
);
ALTER TABLE tenant_erasures OWNER TO iaf_owner;
REVOKE ALL ON tenant_erasures FROM PUBLIC;

CALL app.lock_down_functions();
