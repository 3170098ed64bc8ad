-- 006: tenants, the system-default tenant, and tenant membership.
-- `tenants` has exactly the 13 fields of the Phase 1 design; region, plan, status and slug are
-- checked by the database so that no code path can store a value the product does not know.

CREATE TABLE IF NOT EXISTS tenants (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          varchar(255) NOT NULL,
    slug          varchar(100) NOT NULL,
    region        varchar(2)   NOT NULL,
    plan          varchar(50)  NOT NULL DEFAULT 'free',
    status        varchar(50)  NOT NULL DEFAULT 'trial',
    admin_email   varchar(255),
    admin_phone   varchar(50),
    settings      jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    trial_ends_at timestamptz,
    CONSTRAINT tenants_slug_key UNIQUE (slug),
    CONSTRAINT tenants_region_valid CHECK (region IN ('DZ', 'CH', 'FR', 'BE', 'CA')),
    CONSTRAINT tenants_plan_valid CHECK (plan IN ('free', 'pro', 'enterprise')),
    CONSTRAINT tenants_status_valid CHECK (status IN ('active', 'suspended', 'trial', 'cancelled')),
    -- URL-safe: lowercase ASCII words joined by single dashes.
    CONSTRAINT tenants_slug_format CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$'),
    CONSTRAINT tenants_admin_email_format CHECK (admin_email IS NULL OR admin_email ~ '^[^@\s]+@[^@\s]+$'),
    CONSTRAINT tenants_settings_object CHECK (jsonb_typeof(settings) = 'object'),
    CONSTRAINT tenants_metadata_object CHECK (jsonb_typeof(metadata) = 'object')
);

CREATE INDEX IF NOT EXISTS idx_tenants_region ON tenants (region);

CREATE OR REPLACE TRIGGER tenants_touch_updated_at
    BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

-- Every row that existed before tenancy belongs to this tenant (see 007).
INSERT INTO tenants (id, name, slug, region, plan, status, metadata)
VALUES ('00000000-0000-0000-0000-000000000000', 'System default', 'system-default', 'CH',
        'enterprise', 'active', '{"type": "system"}'::jsonb)
ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS tenant_users (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    user_id    integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       varchar(20) NOT NULL DEFAULT 'member',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id),
    CONSTRAINT tenant_users_role_valid CHECK (role IN ('owner', 'admin', 'member', 'viewer'))
);

-- "Which tenants does this user belong to?" (login, tenant selection).
CREATE INDEX IF NOT EXISTS idx_tenant_users_user ON tenant_users (user_id);
-- The single-column idx_{table}_tenant of the original plan is left out on purpose, here and
-- on every tenant table: the composite index below leads with tenant_id, so it serves every
-- query the single-column one would, and a second index would only slow writes.
CREATE INDEX IF NOT EXISTS idx_tenant_users_tenant_created ON tenant_users (tenant_id, created_at DESC);

CREATE OR REPLACE TRIGGER tenant_users_touch_updated_at
    BEFORE UPDATE ON tenant_users
    FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();
