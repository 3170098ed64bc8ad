-- 012: what a new user meets in their first hour: money in the tenant's own currency, the plan's
-- credits for one tenant at a time, a document's detected language, a project's owner, and an
-- audited tenant creation.

------------------------------------------------------------------------------------------------
-- Currency follows the tenant's region unless set explicitly. 007 gave billing_accounts and
-- crm_deals a fixed default of 'CHF', so an Algerian tenant's balance was in Swiss francs. A row
-- inserted without a currency (NULL or omitted) now takes its tenant's region's, whichever path
-- inserts it (the credit functions of 010, the API, the CLI).
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.region_currency(p_region text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT CASE p_region WHEN 'DZ' THEN 'DZD' WHEN 'CH' THEN 'CHF' WHEN 'FR' THEN 'EUR'
                             WHEN 'BE' THEN 'EUR' WHEN 'CA' THEN 'CAD' END
    $$;

-- A definer: the row's tenant is read whoever inserts (a tenant scope sees only its own tenant,
-- the credit functions run as iaf_owner). A trigger function cannot be called directly.
CREATE OR REPLACE FUNCTION app.default_currency() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF NEW.currency IS NULL THEN
        SELECT app.region_currency(t.region) INTO NEW.currency FROM public.tenants t WHERE t.id = NEW.tenant_id;
    END IF;
    RETURN NEW;
END
$$;

ALTER TABLE billing_accounts ALTER COLUMN currency DROP DEFAULT;
ALTER TABLE crm_deals ALTER COLUMN currency DROP DEFAULT;
CREATE OR REPLACE TRIGGER billing_accounts_default_currency BEFORE INSERT ON billing_accounts
    FOR EACH ROW EXECUTE FUNCTION app.default_currency();
CREATE OR REPLACE TRIGGER crm_deals_default_currency BEFORE INSERT ON crm_deals
    FOR EACH ROW EXECUTE FUNCTION app.default_currency();

-- Accounts that took the old default in a region that does not use it are corrected, but only
-- while no credit has moved: an account with ledger rows keeps the currency its history is in.
UPDATE billing_accounts a SET currency = app.region_currency(t.region)
FROM tenants t
WHERE t.id = a.tenant_id AND t.region IN ('DZ', 'FR', 'BE', 'CA') AND a.currency = 'CHF'
  AND NOT EXISTS (SELECT 1 FROM credit_transactions c WHERE c.tenant_id = a.tenant_id);

------------------------------------------------------------------------------------------------
-- The monthly plan grant for one tenant (`iafactory demo` grants its own tenants), and the
-- grant for all tenants built on it: one idempotency key per tenant and month, one code path.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION platform.grant_monthly_to(p_tenant uuid, p_month date DEFAULT current_date)
    RETURNS TABLE (tenant_id uuid, slug text, credits bigint, granted boolean, balance bigint, currency text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    t record;
    v_granted boolean := false;
BEGIN
    PERFORM app.assert_platform_operator();
    SELECT tn.id, tn.slug::text AS slug, tn.status, l.monthly_credits INTO t
    FROM public.tenants tn CROSS JOIN LATERAL app.tenant_limits(tn.id) l
    WHERE tn.id = p_tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no tenant %', p_tenant USING ERRCODE = 'IA404';
    END IF;
    IF t.status IN ('active', 'trial') AND t.monthly_credits > 0 THEN
        SELECT NOT r.duplicate INTO v_granted FROM internal.apply_credit(
            t.id, 'grant', t.monthly_credits, 'monthly plan grant ' || to_char(p_month, 'YYYY-MM'),
            'monthly:' || to_char(p_month, 'YYYY-MM'), NULL) r;
    END IF;
    RETURN QUERY
        SELECT t.id, t.slug, t.monthly_credits, v_granted, coalesce(a.credit_balance, 0::bigint),
               coalesce(a.currency::text, app.region_currency(tn.region))
        FROM public.tenants tn LEFT JOIN public.billing_accounts a ON a.tenant_id = tn.id
        WHERE tn.id = t.id;
END
$$;

CREATE OR REPLACE FUNCTION platform.grant_monthly(p_month date DEFAULT current_date)
    RETURNS TABLE (tenant_id uuid, slug text, credits bigint, granted boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_id uuid;
BEGIN
    PERFORM app.assert_platform_operator();
    FOR v_id IN
        SELECT tn.id FROM public.tenants tn CROSS JOIN LATERAL app.tenant_limits(tn.id) l
        WHERE tn.status IN ('active', 'trial') AND l.monthly_credits > 0
        ORDER BY tn.created_at, tn.id
    LOOP
        RETURN QUERY SELECT g.tenant_id, g.slug, g.credits, g.granted FROM platform.grant_monthly_to(v_id, p_month) g;
    END LOOP;
END
$$;

------------------------------------------------------------------------------------------------
-- A document's detected language: the dominant language of its chunks, kept by the indexing
-- worker beside the client's own `language` (which the API shows first when set). A column of its
-- own, so that the worker's write neither moves updated_at nor queues another indexing job.
------------------------------------------------------------------------------------------------
ALTER TABLE knowledge_base ADD COLUMN IF NOT EXISTS detected_language varchar(8);

-- Documents indexed before this migration: the language covering most of their text.
UPDATE knowledge_base d SET detected_language = dominant.language
FROM (SELECT DISTINCT ON (c.tenant_id, c.document_id) c.tenant_id, c.document_id, c.language
      FROM knowledge_chunks c WHERE c.language IS NOT NULL
      GROUP BY c.tenant_id, c.document_id, c.language
      ORDER BY c.tenant_id, c.document_id, sum(c.char_end - c.char_start) DESC, c.language) dominant
WHERE d.tenant_id = dominant.tenant_id AND d.id = dominant.document_id
  AND d.language IS NULL AND d.detected_language IS NULL;

------------------------------------------------------------------------------------------------
-- A project belongs to the user who created it. With an API key no user is set (the key acts for
-- the tenant, not for a person), so such projects have no owner.
------------------------------------------------------------------------------------------------
ALTER TABLE projects ALTER COLUMN owner_id SET DEFAULT app.current_user_id();

------------------------------------------------------------------------------------------------
-- Tenant creation is audited, whichever path creates it (the platform API, the CLI). Like every
-- audit row it records who (user, or the operator's login) and, for a request, its IP and id.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.audit_tenant_created() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF app.bulk_operation() THEN
        RETURN NULL;  -- a restore brings the tenant's own audit log back
    END IF;
    INSERT INTO public.audit_events (tenant_id, action, target_type, target_id, details)
    VALUES (NEW.id, 'tenant.created', 'tenant', NEW.id::text,
            jsonb_build_object('name', NEW.name, 'slug', NEW.slug, 'region', NEW.region, 'plan', NEW.plan,
                               'status', NEW.status));
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER tenants_audit_created AFTER INSERT ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.audit_tenant_created();

CALL app.lock_down_functions();
