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
