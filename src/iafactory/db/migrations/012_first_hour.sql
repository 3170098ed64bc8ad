-- 012: what a new user meets in their first hour: money in the tenant's own currency, the plan's
-- credits for one tenant at a time, a document's detected language, a project's owner, and an
-- audited tenant creation.

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
