-- 029: registration that does not tell whether an email has an account, email verification, and
-- the purge of spent credentials and old security events (issue 13).
--
-- * users.email_verified_at: when the account proved it receives mail at its address. NULL only
--   for an account that registered itself (POST /auth/register) and has not opened its "verify
--   your address" link yet; such an account signs in but cannot create a tenant. Every other way
--   an account comes to exist proves the address or is vouched for by an operator, so the column's
--   default is now(): accepting an invitation (its link came by email), `tenants add-user`
--   (operators), demo data, platform administrators, a tenant move (which copies the value). The
--   accounts that exist before this migration were created before the rule: verified (the
--   default fills them). A password reset confirmed, or an invitation accepted by a signed-in
--   account, proves the address too and verifies it.
-- * email_verifications: single-use tokens `eml_<cell>_<random>` (valid 24 hours), only an HMAC
--   stored, like password_resets: a person-level table, row security forced, read and written only
--   by the definer functions below.
-- * app.register_account does the same work for a known and an unknown email (one statement, an
--   email queued either way: "verify your address" or "you already have an account"), so neither
--   the answer nor its cost tells whether the address has an account.
-- * app.purge_account_records: ended sessions, spent refresh tokens, used or expired reset,
--   verification and invitation tokens, and old security events, past their retention (the
--   worker's periodic maintenance calls it in batches).

ALTER TABLE users ADD COLUMN IF NOT EXISTS email_verified_at timestamptz DEFAULT now();
GRANT SELECT (email_verified_at) ON users TO iaf_app;  -- GET /me shows it; only definer functions set it

CREATE TABLE IF NOT EXISTS email_verifications (
    token_hash  bytea PRIMARY KEY,        -- HMAC of the token
    user_id     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,              -- used, or replaced by a newer link
    ip          inet
);
CREATE INDEX IF NOT EXISTS email_verifications_user ON email_verifications (user_id) WHERE used_at IS NULL;
CREATE INDEX IF NOT EXISTS email_verifications_expires ON email_verifications (expires_at);
ALTER TABLE email_verifications OWNER TO iaf_owner;
ALTER TABLE email_verifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE email_verifications FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS definer_all ON email_verifications;
CREATE POLICY definer_all ON email_verifications AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON email_verifications FROM PUBLIC;

-- For the purge.
CREATE INDEX IF NOT EXISTS user_sessions_ended ON user_sessions (coalesce(revoked_at, expires_at));
CREATE INDEX IF NOT EXISTS security_events_created ON security_events (created_at);

-- A registration of p_email. An unknown address: a new unverified account (p_name, p_password_hash),
-- a verification token (p_token_hash, valid p_hours) and the "verify your address" email
-- (p_verify_*). A known one: the account is left as it is and the "you already have an account"
-- email (p_exists_*) is queued instead. Both messages are rendered by the caller, who cannot know
-- which one goes out. A concurrent registration of the same address counts as known. Returns the
-- account and whether it was created (for the security log; never for the answer).
CREATE OR REPLACE FUNCTION app.register_account(
    p_email text, p_name text, p_password_hash text, p_token_hash bytea, p_hours integer, p_ip inet,
    p_verify_language text, p_verify_subject text, p_verify_text text, p_verify_html text,
    p_exists_language text, p_exists_subject text, p_exists_text text, p_exists_html text)
    RETURNS TABLE (user_id integer, created boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_user integer;
BEGIN
    SELECT u.id INTO v_user FROM public.users u WHERE lower(u.email) = lower(p_email);
    IF NOT FOUND THEN
        INSERT INTO public.users (email, name, password_hash, email_verified_at)
        VALUES (p_email, coalesce(p_name, ''), p_password_hash, NULL)
        ON CONFLICT DO NOTHING
        RETURNING id INTO v_user;
        IF v_user IS NOT NULL THEN
            INSERT INTO public.email_verifications (token_hash, user_id, expires_at, ip)
            VALUES (p_token_hash, v_user, now() + make_interval(hours => least(greatest(p_hours, 1), 72)), p_ip);
            PERFORM app.enqueue_email(p_email, 'verify_email', p_verify_language, p_verify_subject, p_verify_text,
                                      p_verify_html);
            RETURN QUERY SELECT v_user, true;
            RETURN;
        END IF;
        SELECT u.id INTO v_user FROM public.users u WHERE lower(u.email) = lower(p_email);
    END IF;
    PERFORM app.enqueue_email(p_email, 'account_exists', p_exists_language, p_exists_subject, p_exists_text,
                              p_exists_html);
    RETURN QUERY SELECT v_user, false;
END
$$;

-- Use a verification token: its account's address is verified (once; other links of the account die).
-- outcome: ok, unknown (no such token, or its account is gone or disabled), used (or replaced by a
-- newer link), expired.
CREATE OR REPLACE FUNCTION app.confirm_email_verification(p_token_hash bytea)
    RETURNS TABLE (outcome text, user_id integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT x.user_id, x.expires_at, x.used_at, u.is_active INTO r
      FROM public.email_verifications x JOIN public.users u ON u.id = x.user_id
     WHERE x.token_hash = p_token_hash FOR UPDATE OF x;
    IF NOT FOUND OR NOT r.is_active THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::integer;
        RETURN;
    END IF;
    IF r.used_at IS NOT NULL OR r.expires_at <= now() THEN
        RETURN QUERY SELECT CASE WHEN r.used_at IS NOT NULL THEN 'used' ELSE 'expired' END, r.user_id;
        RETURN;
    END IF;
    UPDATE public.email_verifications x SET used_at = now() WHERE x.user_id = r.user_id AND x.used_at IS NULL;
    UPDATE public.users u SET email_verified_at = now() WHERE u.id = r.user_id AND u.email_verified_at IS NULL;
    RETURN QUERY SELECT 'ok'::text, r.user_id;
END
$$;

-- A new verification link for the caller (app.user_id): its earlier links die, the new one
-- (p_token_hash, valid p_hours) is stored and the email queued to the account's address.
-- outcome: sent, verified (nothing to do), unknown (no active account).
CREATE OR REPLACE FUNCTION app.resend_email_verification(
    p_token_hash bytea, p_hours integer, p_ip inet, p_language text, p_subject text, p_text text, p_html text)
    RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    u record;
BEGIN
    SELECT x.id, x.email::text AS email, x.email_verified_at INTO u
      FROM public.users x WHERE x.id = app.current_user_id() AND x.is_active FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    IF u.email_verified_at IS NOT NULL THEN
        RETURN 'verified';
    END IF;
    UPDATE public.email_verifications x SET used_at = now() WHERE x.user_id = u.id AND x.used_at IS NULL;
    INSERT INTO public.email_verifications (token_hash, user_id, expires_at, ip)
    VALUES (p_token_hash, u.id, now() + make_interval(hours => least(greatest(p_hours, 1), 72)), p_ip);
    PERFORM app.enqueue_email(u.email, 'verify_email', p_language, p_subject, p_text, p_html);
    RETURN 'sent';
END
$$;

-- A confirmed password reset proves the address (the link came by email): as 027, and the account
-- is verified.
CREATE OR REPLACE FUNCTION app.confirm_password_reset(p_token_hash bytea, p_new_hash text)
    RETURNS TABLE (outcome text, user_id integer, email text, ended integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    r record;
    v_ended integer;
BEGIN
    SELECT x.user_id, x.expires_at, x.used_at, u.email::text AS email, u.is_active INTO r
      FROM public.password_resets x JOIN public.users u ON u.id = x.user_id
     WHERE x.token_hash = p_token_hash FOR UPDATE OF x;
    IF NOT FOUND OR NOT r.is_active THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::integer, NULL::text, 0;
        RETURN;
    END IF;
    IF r.used_at IS NOT NULL OR r.expires_at <= now() THEN
        RETURN QUERY SELECT CASE WHEN r.used_at IS NOT NULL THEN 'used' ELSE 'expired' END, r.user_id, r.email, 0;
        RETURN;
    END IF;
    UPDATE public.password_resets x SET used_at = now() WHERE x.token_hash = p_token_hash;
    UPDATE public.users u SET password_hash = p_new_hash, password_changed_at = now(),
                              email_verified_at = coalesce(u.email_verified_at, now())
     WHERE u.id = r.user_id;
    UPDATE public.user_sessions s SET revoked_at = now(), revoked_reason = 'password reset'
     WHERE s.user_id = r.user_id AND s.revoked_at IS NULL;
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN QUERY SELECT 'ok'::text, r.user_id, r.email, v_ended;
END
$$;

-- Accepting an invitation proves the address too (as 026; a signed-in account that accepts is
-- verified, a new account is verified by the column's default).
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
        UPDATE public.users u SET email_verified_at = v_now WHERE u.id = v_user AND u.email_verified_at IS NULL;
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

-- Self-service tenants (028) need a verified address: an account that registered itself and has
-- not opened its link is refused (IA403; the detail names the problem type for the HTTP answer).
CREATE OR REPLACE FUNCTION app.create_own_tenant(p_id uuid, p_name text, p_slug text, p_region text,
                                                 p_trial_days integer, p_max_trials integer)
    RETURNS SETOF platform.tenant_record
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_user integer := app.current_user_id();
    v_verified timestamptz;
    v_trials integer;
BEGIN
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'creating a tenant needs a signed-in user' USING ERRCODE = 'IA403';
    END IF;
    SELECT u.email_verified_at INTO v_verified FROM public.users u WHERE u.id = v_user AND u.is_active FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this account is not active' USING ERRCODE = 'IA403';
    END IF;
    IF v_verified IS NULL THEN
        RAISE EXCEPTION 'verify your email address first: open the link we sent you, or ask for a new one '
                        '(POST /api/v1/auth/verify-email/resend)'
              USING ERRCODE = 'IA403', DETAIL = 'type=email-not-verified';
    END IF;
    SELECT count(*) INTO v_trials FROM app.user_memberships(v_user) m WHERE m.role = 'owner' AND m.status = 'trial';
    IF v_trials >= p_max_trials THEN
        RAISE EXCEPTION 'you already own % tenants in trial, the most one account may create; '
                        'upgrade one or ask the platform team', v_trials USING ERRCODE = 'IA403';
    END IF;
    INSERT INTO public.tenant_slugs (slug, tenant) VALUES (p_slug, p_id);  -- a taken slug: unique_violation
    RETURN QUERY
        INSERT INTO public.tenants (id, name, slug, region, plan, status, settings, metadata, trial_ends_at)
        VALUES (p_id, p_name, p_slug, p_region, 'free', 'trial', '{}'::jsonb, '{}'::jsonb,
                now() + make_interval(days => p_trial_days))
        RETURNING id, name, slug, region, plan, status, admin_email, admin_phone, settings, metadata,
                  created_at, updated_at, trial_ends_at;
    INSERT INTO public.tenant_users (tenant_id, user_id, role) VALUES (p_id, v_user, 'owner');
END
$$;

-- Whether the caller's (app.user_id) address is verified (NULL: no active account).
CREATE OR REPLACE FUNCTION app.my_email_verified() RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v boolean;
BEGIN
    SELECT u.email_verified_at IS NOT NULL INTO v FROM public.users u WHERE u.id = app.current_user_id() AND u.is_active;
    RETURN v;
END
$$;

-- The purge (the worker calls it periodically, until a kind returns fewer than p_limit rows):
-- at most p_limit rows of each kind, oldest first.
--   sessions         ended (revoked or expired) more than p_session_days ago, with their refresh
--                    tokens; and refresh tokens rotated more than p_session_days ago
--   tokens           reset and verification tokens used or expired more than p_token_days ago, and
--                    invitations accepted, revoked or expired that long ago (tenant by tenant)
--   security_events  older than p_event_days
-- The retentions have floors (1 day for sessions and tokens, 30 days for security events): the
-- application role can call this, and must not be able to wipe a recent trail with it.
CREATE OR REPLACE FUNCTION app.purge_account_records(p_session_days integer, p_token_days integer,
                                                     p_event_days integer, p_limit integer DEFAULT 1000)
    RETURNS TABLE (kind text, deleted integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    v_limit integer := least(greatest(coalesce(p_limit, 1000), 1), 10000);
    v_sessions timestamptz := now() - make_interval(days => greatest(coalesce(p_session_days, 30), 1));
    v_tokens timestamptz := now() - make_interval(days => greatest(coalesce(p_token_days, 30), 1));
    v_events timestamptz := now() - make_interval(days => greatest(coalesce(p_event_days, 180), 30));
    v_ids uuid[];
    v_count integer;
    v_left integer;
    v_tenant uuid;
BEGIN
    SELECT array_agg(s.id) INTO v_ids FROM (
        SELECT x.id FROM public.user_sessions x
         WHERE coalesce(x.revoked_at, x.expires_at) < v_sessions
         ORDER BY coalesce(x.revoked_at, x.expires_at) LIMIT v_limit FOR UPDATE SKIP LOCKED) s;
    DELETE FROM public.refresh_tokens rt WHERE rt.session_id = ANY (coalesce(v_ids, '{}'));
    DELETE FROM public.user_sessions x WHERE x.id = ANY (coalesce(v_ids, '{}'));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN QUERY SELECT 'sessions'::text, v_count;

    DELETE FROM public.refresh_tokens rt
     WHERE rt.token_hash = ANY (ARRAY(SELECT t.token_hash FROM public.refresh_tokens t
                                       WHERE t.rotated_at < v_sessions
                                       ORDER BY t.rotated_at LIMIT v_limit FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN QUERY SELECT 'refresh_tokens'::text, v_count;

    DELETE FROM public.password_resets r
     WHERE r.token_hash = ANY (ARRAY(SELECT t.token_hash FROM public.password_resets t
                                      WHERE coalesce(t.used_at, t.expires_at) < v_tokens
                                      ORDER BY coalesce(t.used_at, t.expires_at) LIMIT v_limit FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN QUERY SELECT 'password_resets'::text, v_count;

    DELETE FROM public.email_verifications r
     WHERE r.token_hash = ANY (ARRAY(SELECT t.token_hash FROM public.email_verifications t
                                      WHERE coalesce(t.used_at, t.expires_at) < v_tokens
                                      ORDER BY coalesce(t.used_at, t.expires_at) LIMIT v_limit FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN QUERY SELECT 'email_verifications'::text, v_count;

    -- Invitations are tenant rows: tenant by tenant, naming the tenant in every statement.
    v_left := v_limit;
    v_count := 0;
    FOR v_tenant IN
        SELECT DISTINCT i.tenant_id FROM public.invitations i
         WHERE coalesce(i.accepted_at, i.revoked_at, i.expires_at) < v_tokens
    LOOP
        SELECT array_agg(i.id) INTO v_ids FROM (
            SELECT x.id FROM public.invitations x
             WHERE x.tenant_id = v_tenant AND coalesce(x.accepted_at, x.revoked_at, x.expires_at) < v_tokens
             ORDER BY x.created_at LIMIT v_left FOR UPDATE SKIP LOCKED) i;
        DELETE FROM public.invitations d WHERE d.tenant_id = v_tenant AND d.id = ANY (coalesce(v_ids, '{}'));
        GET DIAGNOSTICS v_left = ROW_COUNT;
        v_count := v_count + v_left;
        v_left := v_limit - v_count;
        EXIT WHEN v_left <= 0;
    END LOOP;
    RETURN QUERY SELECT 'invitations'::text, v_count;

    DELETE FROM public.security_events e
     WHERE e.id = ANY (ARRAY(SELECT x.id FROM public.security_events x WHERE x.created_at < v_events
                              ORDER BY x.created_at LIMIT v_limit FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN QUERY SELECT 'security_events'::text, v_count;
END
$$;

CALL app.lock_down_functions();
