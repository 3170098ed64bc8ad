-- 022: the directory (control plane of the region cells) and cell-routable API keys.
--
-- With IAFACTORY_CELLS set, the DATABASE_URL database is the directory: it holds only what routing
-- needs — each tenant's id, slug, region, cell, plan and status, and for email-first sign-in a keyed
-- hash (HMAC-SHA256 with a server secret) of each login email with the cells where that person
-- has an account. No name, no plaintext email or phone, no row of a tenant table: those live in
-- the tenant's cell. The same migrations run everywhere, so a cell has these tables too (empty)
-- and the directory has the tenant tables (empty, and refusing any tenant: `migrate` records no
-- region for it in cell_regions).
--
-- API keys name their cell in their visible prefix (iaf_live_<cell>_<id>), so a key is routed
-- without asking the directory; the prefix column grows to hold a cell name of up to 32 characters
-- (a varchar widening: a catalog change, no table rewrite).

CREATE SCHEMA IF NOT EXISTS directory AUTHORIZATION iaf_owner;
REVOKE ALL ON SCHEMA directory FROM PUBLIC;
GRANT USAGE ON SCHEMA directory TO iaf_app;

CREATE TABLE IF NOT EXISTS directory.tenants (
    id          uuid PRIMARY KEY,
    slug        varchar(63) NOT NULL CONSTRAINT directory_tenants_slug_key UNIQUE,
    region      varchar(2) NOT NULL CHECK (region IN ('DZ', 'CH', 'FR', 'BE', 'CA')),
    cell        text NOT NULL CHECK (cell ~ '^[a-z][a-z0-9-]{0,31}$'),
    plan        varchar(50) NOT NULL,
    status      varchar(20) NOT NULL,
    -- Set while `tenants move` copies the tenant to another cell; the tenant is read-only meanwhile.
    moving_to   text CHECK (moving_to ~ '^[a-z][a-z0-9-]{0,31}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_directory_tenants_cell ON directory.tenants (cell);

-- One row per (person, cell): a consultant working for tenants in two regions has two.
CREATE TABLE IF NOT EXISTS directory.logins (
    email_hmac  bytea NOT NULL CHECK (octet_length(email_hmac) = 32),
    cell        text NOT NULL CHECK (cell ~ '^[a-z][a-z0-9-]{0,31}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email_hmac, cell)
);

-- After a move the keys of the moved tenant still name their first cell: the prefixes that moved
-- point here to the cell that holds them now (looked up only when the named cell does not know a key).
CREATE TABLE IF NOT EXISTS directory.moved_api_keys (
    prefix      varchar(64) PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES directory.tenants (id) ON DELETE CASCADE,
    cell        text NOT NULL CHECK (cell ~ '^[a-z][a-z0-9-]{0,31}$')
);

ALTER TABLE directory.tenants OWNER TO iaf_owner;
ALTER TABLE directory.logins OWNER TO iaf_owner;
ALTER TABLE directory.moved_api_keys OWNER TO iaf_owner;
REVOKE ALL ON directory.tenants, directory.logins, directory.moved_api_keys FROM PUBLIC;
-- The service registers people (register, invitations) and tenants (platform administrators) and
-- reads routes; the directory holds nothing a tenant could use against another.
GRANT SELECT, INSERT, UPDATE, DELETE ON directory.tenants, directory.logins, directory.moved_api_keys TO iaf_app;

ALTER TABLE api_keys ALTER COLUMN prefix TYPE varchar(64);

-- The login emails a cell holds, for `iafactory migrate` to hash into the directory (operators only).
CREATE OR REPLACE FUNCTION platform.login_emails() RETURNS TABLE (email text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY SELECT u.email::text FROM public.users u WHERE u.password_hash IS NOT NULL ORDER BY u.id;
END
$$;

-- A tenant whose id is chosen by the caller: with cells, the directory registers the id first.
CREATE OR REPLACE FUNCTION platform.tenant_create(
    p_name text, p_slug text, p_region text, p_plan text, p_status text, p_admin_email text,
    p_admin_phone text, p_settings jsonb, p_metadata jsonb, p_trial_ends_at timestamptz, p_id uuid)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    INSERT INTO public.tenant_slugs (slug, tenant) VALUES (p_slug, p_id);  -- a taken slug: unique_violation
    RETURN QUERY
        INSERT INTO public.tenants (id, name, slug, region, plan, status, admin_email, admin_phone,
                                    settings, metadata, trial_ends_at)
        VALUES (p_id, p_name, p_slug, p_region, p_plan, p_status, p_admin_email, p_admin_phone,
                coalesce(p_settings, '{}'::jsonb), coalesce(p_metadata, '{}'::jsonb), p_trial_ends_at)
        RETURNING id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata,
                  created_at, updated_at, trial_ends_at;
END
$$;

CREATE OR REPLACE FUNCTION platform.tenant_create(
    p_name text, p_slug text, p_region text, p_plan text, p_status text, p_admin_email text,
    p_admin_phone text, p_settings jsonb, p_metadata jsonb, p_trial_ends_at timestamptz)
    RETURNS SETOF platform.tenant_record
    LANGUAGE sql SECURITY DEFINER SET search_path = ''
    AS $$
    SELECT * FROM platform.tenant_create(p_name, p_slug, p_region, p_plan, p_status, p_admin_email, p_admin_phone,
                                         p_settings, p_metadata, p_trial_ends_at, pg_catalog.gen_random_uuid())
$$;

CALL app.lock_down_functions();
