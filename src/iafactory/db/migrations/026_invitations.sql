-- 026: invitations by email (issue 13). An admin invites an address with a role; the email carries
-- a single-use token `inv_<cell>_<random>` (valid 7 days) of which only an HMAC is stored here.
-- Accepting joins the tenant (an existing account of that email in this cell, or a new account
-- created on the spot). A tenant table like the others: tenant_id leads its key and its policy.
-- The accept step runs before any tenant is known (the token names it): app.find_invitation reads
-- across tenants by the token's hash, like app.authenticate_api_key by a key's prefix, and
-- app.accept_invitation then names that tenant in every statement.

CREATE TABLE IF NOT EXISTS invitations (
    tenant_id    uuid NOT NULL DEFAULT app.current_tenant_id() REFERENCES tenants (id) ON DELETE RESTRICT,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    email        varchar(320) NOT NULL,
    role         varchar(20) NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    invited_by   integer REFERENCES users (id) ON DELETE SET NULL,
    token_hash   bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    accepted_at  timestamptz,
    accepted_by  integer REFERENCES users (id) ON DELETE SET NULL,
    revoked_at   timestamptz,
    last_sent_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX IF NOT EXISTS idx_invitations_token ON invitations (token_hash);
CREATE INDEX IF NOT EXISTS idx_invitations_tenant_created ON invitations (tenant_id, created_at DESC);

ALTER TABLE invitations OWNER TO iaf_owner;
ALTER TABLE invitations ENABLE ROW LEVEL SECURITY;
ALTER TABLE invitations FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON invitations;
CREATE POLICY tenant_isolation ON invitations AS PERMISSIVE FOR ALL TO PUBLIC
    USING (tenant_id = app.current_tenant_id()) WITH CHECK (tenant_id = app.current_tenant_id());
DROP POLICY IF EXISTS definer_all ON invitations;
CREATE POLICY definer_all ON invitations AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON invitations FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON invitations TO iaf_app;

-- The invitation a token's hash names (at most one in practice: the token is random), and its email
-- (to record a new account's login in the directory before creating it). A read across tenants: the token is what names the tenant.
CREATE OR REPLACE FUNCTION app.find_invitation(p_token_hash bytea)
    RETURNS TABLE (tenant_id uuid, id uuid, email text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT i.tenant_id, i.id, i.email::text FROM public.invitations i WHERE i.token_hash = p_token_hash LIMIT 2;
END
$$;

-- Accept invitation (p_tenant, p_id) presented with the token hashing to p_token_hash: as account
-- p_user_id (which must have the invited email), or, with p_user_id NULL, as a new account
-- (p_name, p_password_hash) for the invited email. One outcome:
--   joined     the account is now a member with the invited role (the invitation is used up)
--   unknown    no such invitation (or the token does not match it)
--   used       accepted already            revoked   revoked by an admin
--   expired    past expires_at             inactive  the tenant is suspended or closed
--   other_email  p_user_id's email is not the invited one
--   exists     p_user_id NULL, but an account with this email exists here: sign in first
--   member     the account is a member already (the invitation stays usable for nobody else: used)
CREATE OR REPLACE FUNCTION app.accept_invitation(p_tenant uuid, p_id uuid, p_token_hash bytea, p_user_id integer,
                                                 p_name text, p_password_hash text)
    RETURNS TABLE (outcome text, user_id integer, email text, role text, slug text, name text, status text)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    inv record;
    t record;
    v_user integer;
    v_email text;
    v_role text;
    v_now timestamptz := now();
BEGIN
    SELECT i.email::text AS email, i.role::text AS role, i.expires_at, i.accepted_at, i.revoked_at INTO inv
      FROM public.invitations i
     WHERE i.tenant_id = p_tenant AND i.id = p_id AND i.token_hash = p_token_hash
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::integer, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT x.slug::text AS slug, x.name::text AS name, x.status::text AS status INTO t
      FROM public.tenants x WHERE x.id = p_tenant;
    outcome := CASE WHEN inv.accepted_at IS NOT NULL THEN 'used'
                    WHEN inv.revoked_at IS NOT NULL THEN 'revoked'
                    WHEN inv.expires_at <= v_now THEN 'expired'
                    WHEN t.status NOT IN ('active', 'trial') THEN 'inactive' END;
    IF outcome IS NOT NULL THEN
        RETURN QUERY SELECT outcome, NULL::integer, inv.email, inv.role, t.slug, t.name, t.status;
        RETURN;
    END IF;
    IF p_user_id IS NOT NULL THEN
        SELECT u.id, u.email::text INTO v_user, v_email FROM public.users u WHERE u.id = p_user_id AND u.is_active;
        IF NOT FOUND OR lower(v_email) <> lower(inv.email) THEN
            RETURN QUERY SELECT 'other_email'::text, NULL::integer, inv.email, inv.role, t.slug, t.name, t.status;
            RETURN;
        END IF;
    ELSE
        IF EXISTS (SELECT 1 FROM public.users u WHERE lower(u.email) = lower(inv.email)) THEN
            RETURN QUERY SELECT 'exists'::text, NULL::integer, inv.email, inv.role, t.slug, t.name, t.status;
            RETURN;
        END IF;
        INSERT INTO public.users (email, name, password_hash) VALUES (inv.email, coalesce(p_name, ''), p_password_hash)
        RETURNING id INTO v_user;
    END IF;
    INSERT INTO public.tenant_users AS tu (tenant_id, user_id, role) VALUES (p_tenant, v_user, inv.role)
    ON CONFLICT ON CONSTRAINT tenant_users_pkey DO NOTHING;
    IF NOT FOUND THEN
        -- A member already: the invitation is used up, the existing role stays.
        outcome := 'member';
        SELECT tu.role::text INTO v_role FROM public.tenant_users tu WHERE tu.tenant_id = p_tenant AND tu.user_id = v_user;
    ELSE
        outcome := 'joined';
    END IF;
    UPDATE public.invitations SET accepted_at = v_now, accepted_by = v_user
     WHERE tenant_id = p_tenant AND id = p_id;
    RETURN QUERY SELECT outcome, v_user, inv.email, coalesce(v_role, inv.role), t.slug, t.name, t.status;
END
$$;

-- An invitation written by the platform (a tenant created with an admin_email, `iafactory tenants
-- add-user` for an unknown email): an operator's login or a platform administrator's request.
CREATE OR REPLACE FUNCTION platform.create_invitation(p_tenant uuid, p_email text, p_role text, p_token_hash bytea,
                                                      p_invited_by integer, p_days integer)
    RETURNS TABLE (id uuid, expires_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        INSERT INTO public.invitations AS i (tenant_id, email, role, invited_by, token_hash, expires_at)
        VALUES (p_tenant, p_email, p_role, p_invited_by, p_token_hash, now() + make_interval(days => p_days))
        RETURNING i.id, i.expires_at;
END
$$;

CALL app.lock_down_functions();
