-- 025: sessions (refresh tokens with reuse detection), sign-in throttling, security events.
--
-- * user_sessions: one row per sign-in (a refresh-token family, RFC 9700 §4.14.2), in the cell of
--   the account. Its id is the access token's `sid` claim; the request gate re-checks it, so a
--   revoked session is refused on its very next request. Refresh tokens are stored as SHA-256
--   hashes only; each is used once (rotated), and presenting one that was already rotated
--   revokes the whole family.
-- * login_throttle: failed sign-ins per account (an HMAC of the email) and per client address (an
--   HMAC of the IP), in fixed one-hour windows, with an exponential backoff after a few free
--   failures. UNLOGGED like rate_counters: a crash forgets the counters, which is harmless. A
--   window, never a lock: whatever an attacker does, the wait ends (at most the window's end).
-- * security_events: events about a person rather than a tenant (failed sign-ins, throttling,
--   refresh-token reuse, logout everywhere, password change), platform-level, read by operators.
--
-- None of these tables has a tenant_id: they belong to people (or addresses), not to tenants.
-- None has a foreign key either (a Citus coordinator keeps them as local tables, see citus.py).

CREATE TABLE IF NOT EXISTS user_sessions (
    id uuid PRIMARY KEY,                  -- the family; the `sid` claim of its access tokens
    user_id integer NOT NULL,
    selected_tenant uuid,                 -- the tenant its tokens act for (NULL: none selected)
    accounts jsonb,                       -- {cell: user id} of a person with accounts in several cells
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    ip inet,
    user_agent text,
    revoked_at timestamptz,
    revoked_reason text
);
CREATE INDEX IF NOT EXISTS user_sessions_user ON user_sessions (user_id) WHERE revoked_at IS NULL;
ALTER TABLE user_sessions OWNER TO iaf_owner;
REVOKE ALL ON user_sessions FROM PUBLIC;  -- only the definer functions below touch it

CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash bytea PRIMARY KEY,         -- sha256 of the opaque token
    session_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    rotated_at timestamptz                -- used once: NOT NULL from then on
);
CREATE INDEX IF NOT EXISTS refresh_tokens_session ON refresh_tokens (session_id);
ALTER TABLE refresh_tokens OWNER TO iaf_owner;
REVOKE ALL ON refresh_tokens FROM PUBLIC;

CREATE UNLOGGED TABLE IF NOT EXISTS login_throttle (
    subject bytea PRIMARY KEY,            -- HMAC of 'account' + email, or of 'ip' + address
    window_start timestamptz NOT NULL,
    failures integer NOT NULL,
    blocked_until timestamptz
);
CREATE INDEX IF NOT EXISTS login_throttle_window ON login_throttle (window_start);
ALTER TABLE login_throttle OWNER TO iaf_owner;
REVOKE ALL ON login_throttle FROM PUBLIC;

CREATE TABLE IF NOT EXISTS security_events (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    event text NOT NULL,
    user_id integer,
    session_id uuid,
    ip inet,
    request_id text,
    details jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS security_events_user ON security_events (user_id, created_at);
ALTER TABLE security_events OWNER TO iaf_owner;
REVOKE ALL ON security_events FROM PUBLIC;

ALTER TABLE users ADD COLUMN IF NOT EXISTS password_changed_at timestamptz;

------------------------------------------------------------------------------------------------
-- Sessions.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.session_start(
    p_id uuid, p_user integer, p_token_hash bytea, p_tenant uuid, p_accounts jsonb, p_ip inet, p_user_agent text,
    p_idle_seconds integer, p_absolute_seconds integer) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    INSERT INTO public.user_sessions (id, user_id, selected_tenant, accounts, expires_at, ip, user_agent)
    VALUES (p_id, p_user, p_tenant, p_accounts,
            now() + make_interval(secs => least(p_idle_seconds, p_absolute_seconds)), p_ip, p_user_agent);
    INSERT INTO public.refresh_tokens (token_hash, session_id) VALUES (p_token_hash, p_id);
END
$$;

-- One use of a refresh token. `outcome`: ok (rotated: p_new_hash is the family's token now),
-- unknown, reused (the family is revoked now), revoked, expired, disabled (revoked now).
CREATE OR REPLACE FUNCTION app.session_refresh(
    p_token_hash bytea, p_new_hash bytea, p_ip inet, p_user_agent text, p_idle_seconds integer,
    p_absolute_seconds integer)
    RETURNS TABLE (outcome text, session_id uuid, user_id integer, selected_tenant uuid, accounts jsonb,
                   is_platform_admin boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    t record;
    s record;
    v_active boolean;
    v_admin boolean;
BEGIN
    SELECT rt.session_id, rt.rotated_at INTO t FROM public.refresh_tokens rt
     WHERE rt.token_hash = p_token_hash FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::uuid, NULL::integer, NULL::uuid, NULL::jsonb, NULL::boolean;
        RETURN;
    END IF;
    SELECT x.* INTO s FROM public.user_sessions x WHERE x.id = t.session_id FOR UPDATE;
    IF t.rotated_at IS NOT NULL THEN
        -- Replayed: whoever holds the newer token and whoever replays this one cannot be told
        -- apart, so neither keeps the session.
        UPDATE public.user_sessions x SET revoked_at = now(), revoked_reason = 'refresh token reused'
         WHERE x.id = t.session_id AND x.revoked_at IS NULL;
        RETURN QUERY SELECT 'reused'::text, s.id, s.user_id, s.selected_tenant, s.accounts, NULL::boolean;
        RETURN;
    END IF;
    IF s.revoked_at IS NOT NULL THEN
        RETURN QUERY SELECT 'revoked'::text, s.id, s.user_id, NULL::uuid, NULL::jsonb, NULL::boolean;
        RETURN;
    END IF;
    IF s.expires_at <= now() THEN
        RETURN QUERY SELECT 'expired'::text, s.id, s.user_id, NULL::uuid, NULL::jsonb, NULL::boolean;
        RETURN;
    END IF;
    SELECT u.is_active, u.is_platform_admin INTO v_active, v_admin FROM public.users u WHERE u.id = s.user_id;
    IF NOT coalesce(v_active, false) THEN
        UPDATE public.user_sessions x SET revoked_at = now(), revoked_reason = 'account disabled' WHERE x.id = s.id;
        RETURN QUERY SELECT 'disabled'::text, s.id, s.user_id, NULL::uuid, NULL::jsonb, NULL::boolean;
        RETURN;
    END IF;
    UPDATE public.refresh_tokens rt SET rotated_at = now() WHERE rt.token_hash = p_token_hash;
    INSERT INTO public.refresh_tokens (token_hash, session_id) VALUES (p_new_hash, s.id);
    UPDATE public.user_sessions x
       SET last_used_at = now(), ip = coalesce(p_ip, x.ip), user_agent = coalesce(p_user_agent, x.user_agent),
           expires_at = least(now() + make_interval(secs => p_idle_seconds),
                              x.created_at + make_interval(secs => p_absolute_seconds))
     WHERE x.id = s.id;
    RETURN QUERY SELECT 'ok'::text, s.id, s.user_id, s.selected_tenant, s.accounts, v_admin;
END
$$;

-- select-tenant within a session: the session now acts for p_tenant, and p_new_hash is its only
-- valid refresh token (the previous ones count as rotated). False when the session has ended.
CREATE OR REPLACE FUNCTION app.session_select(p_session uuid, p_tenant uuid, p_new_hash bytea) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    UPDATE public.user_sessions s SET selected_tenant = p_tenant, last_used_at = now()
     WHERE s.id = p_session AND s.user_id = app.current_user_id() AND s.revoked_at IS NULL AND s.expires_at > now();
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE public.refresh_tokens rt SET rotated_at = now() WHERE rt.session_id = p_session AND rt.rotated_at IS NULL;
    INSERT INTO public.refresh_tokens (token_hash, session_id) VALUES (p_new_hash, p_session);
    RETURN true;
END
$$;

-- The request gate with a session: the session must be the caller's and alive, then the usual
-- checks. p_session NULL (API keys, tokens from before sessions): the usual checks only.
CREATE OR REPLACE FUNCTION app.authorize(p_min_role text, p_write boolean, p_session uuid) RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    IF p_session IS NOT NULL THEN
        PERFORM app.check_session(p_session);
    END IF;
    PERFORM app.authorize(p_min_role, p_write);
END
$$;

CREATE OR REPLACE FUNCTION app.check_session(p_session uuid) RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM 1 FROM public.user_sessions s
     WHERE s.id = p_session AND s.user_id = app.current_user_id() AND s.revoked_at IS NULL AND s.expires_at > now();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'this session has ended: sign in again' USING ERRCODE = 'IA401';
    END IF;
END
$$;

-- The caller's sessions (app.user_id), active ones only.
CREATE OR REPLACE FUNCTION app.my_sessions()
    RETURNS TABLE (id uuid, created_at timestamptz, last_used_at timestamptz, expires_at timestamptz, ip inet,
                   user_agent text, selected_tenant uuid)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT s.id, s.created_at, s.last_used_at, s.expires_at, s.ip, s.user_agent, s.selected_tenant
          FROM public.user_sessions s
         WHERE s.user_id = app.current_user_id() AND s.revoked_at IS NULL AND s.expires_at > now()
         ORDER BY s.last_used_at DESC;
END
$$;

-- Revoke one session of the caller (app.user_id): false when it is not theirs or already ended.
CREATE OR REPLACE FUNCTION app.revoke_my_session(p_session uuid, p_reason text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    UPDATE public.user_sessions s SET revoked_at = now(), revoked_reason = p_reason
     WHERE s.id = p_session AND s.user_id = app.current_user_id() AND s.revoked_at IS NULL;
    RETURN FOUND;
END
$$;

-- Revoke every session of the caller (app.user_id) but p_except (NULL: all). Their number.
CREATE OR REPLACE FUNCTION app.revoke_my_sessions(p_except uuid, p_reason text) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.user_sessions s SET revoked_at = now(), revoked_reason = p_reason
     WHERE s.user_id = app.current_user_id() AND s.revoked_at IS NULL AND s.id IS DISTINCT FROM p_except;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

------------------------------------------------------------------------------------------------
-- Passwords.
------------------------------------------------------------------------------------------------
-- The caller's (app.user_id) email and password hash, for a password change.
CREATE OR REPLACE FUNCTION app.my_login() RETURNS TABLE (email text, password_hash text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    RETURN QUERY
        SELECT u.email::text, u.password_hash FROM public.users u WHERE u.id = app.current_user_id() AND u.is_active;
END
$$;

-- Replace the caller's password, if it is still p_old_hash (a concurrent change wins once).
CREATE OR REPLACE FUNCTION app.change_my_password(p_old_hash text, p_new_hash text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    UPDATE public.users u SET password_hash = p_new_hash, password_changed_at = now()
     WHERE u.id = app.current_user_id() AND u.password_hash = p_old_hash;
    RETURN FOUND;
END
$$;

------------------------------------------------------------------------------------------------
-- Security events.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION app.record_security_event(
    p_event text, p_user integer, p_session uuid, p_ip inet, p_request_id text, p_details jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    INSERT INTO public.security_events (event, user_id, session_id, ip, request_id, details)
    VALUES (p_event, p_user, p_session, p_ip, p_request_id, coalesce(p_details, '{}'::jsonb));
END
$$;

------------------------------------------------------------------------------------------------
-- Sign-in throttling.
------------------------------------------------------------------------------------------------
-- Seconds to wait before the next attempt for any of p_subjects (0: go ahead).
CREATE OR REPLACE FUNCTION app.login_throttle_wait(p_subjects bytea[]) RETURNS double precision
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_wait double precision;
BEGIN
    SELECT coalesce(max(extract(epoch FROM t.blocked_until - now())), 0)::double precision INTO v_wait
      FROM public.login_throttle t
     WHERE t.subject = ANY (p_subjects) AND t.blocked_until > now();
    RETURN v_wait;
END
$$;

-- One failed attempt for p_subject: its failures in the current window, the wait it now imposes
-- (p_free failures free, then p_base seconds doubling up to p_cap; p_max failures in the window:
-- wait for the window's end) and whether this failure is the one that engaged the backoff.
CREATE OR REPLACE FUNCTION app.login_throttle_fail(
    p_subject bytea, p_free integer, p_base double precision, p_cap double precision, p_max integer,
    p_window_seconds integer)
    RETURNS TABLE (failures integer, wait_seconds double precision, engaged boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_window interval := make_interval(secs => p_window_seconds);
    v_failures integer;
    v_start timestamptz;
    v_wait double precision := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- a lost counter is harmless
    INSERT INTO public.login_throttle AS t (subject, window_start, failures)
    VALUES (p_subject, now(), 1)
    ON CONFLICT (subject) DO UPDATE
       SET failures = CASE WHEN t.window_start <= now() - v_window THEN 1 ELSE t.failures + 1 END,
           window_start = CASE WHEN t.window_start <= now() - v_window THEN now() ELSE t.window_start END
    RETURNING t.failures, t.window_start INTO v_failures, v_start;
    IF v_failures = 1 THEN  -- a new window: forget the finished ones of everyone
        DELETE FROM public.login_throttle t
         WHERE t.window_start < now() - v_window AND coalesce(t.blocked_until, '-infinity') < now();
    END IF;
    IF v_failures > p_free THEN
        v_wait := least(p_cap, p_base * power(2, least(v_failures - p_free - 1, 30)));
    END IF;
    IF v_failures >= p_max THEN
        v_wait := greatest(v_wait, extract(epoch FROM v_start + v_window - now()));
    END IF;
    UPDATE public.login_throttle t
       SET blocked_until = CASE WHEN v_wait > 0 THEN now() + make_interval(secs => v_wait) END
     WHERE t.subject = p_subject;
    RETURN QUERY SELECT v_failures, v_wait, v_failures = p_free + 1;
END
$$;

CREATE OR REPLACE FUNCTION app.login_throttle_clear(p_subject bytea) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    DELETE FROM public.login_throttle t WHERE t.subject = p_subject;
END
$$;

CALL app.lock_down_functions();
