-- 027: password reset by email (issue 13). A request writes a single-use token `pwr_<cell>_<random>`
-- (valid at most 30 minutes) of which only an HMAC is stored here, and queues the email in the
-- same transaction; confirming it sets the new password and ends every session of the account.
-- A person-level table like security_events and email_outbox: no tenant_id, no foreign key (a
-- Citus coordinator keeps it local), row security forced, read and written only by the definer
-- functions below.

CREATE TABLE IF NOT EXISTS password_resets (
    token_hash  bytea PRIMARY KEY,        -- HMAC of the token
    user_id     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,              -- used, or replaced by a newer request
    ip          inet
);
CREATE INDEX IF NOT EXISTS password_resets_user ON password_resets (user_id) WHERE used_at IS NULL;
CREATE INDEX IF NOT EXISTS password_resets_expires ON password_resets (expires_at);
ALTER TABLE password_resets OWNER TO iaf_owner;
ALTER TABLE password_resets ENABLE ROW LEVEL SECURITY;
ALTER TABLE password_resets FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS definer_all ON password_resets;
CREATE POLICY definer_all ON password_resets AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON password_resets FROM PUBLIC;

-- A reset asked for p_email: when an active account has it, its earlier unused tokens die, the
-- new one (p_token_hash, valid p_minutes) is stored and the email (rendered by the caller, who
-- could not know whether it would be sent) is queued. The same one statement either way, so the
-- answer's timing does not tell whether the account exists. Returns the account, or NULL.
CREATE OR REPLACE FUNCTION app.request_password_reset(
    p_email text, p_token_hash bytea, p_minutes integer, p_ip inet, p_language text, p_subject text, p_text text,
    p_html text) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_user integer;
BEGIN
    SELECT u.id INTO v_user FROM public.users u WHERE lower(u.email) = lower(p_email) AND u.is_active;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE public.password_resets r SET used_at = now() WHERE r.user_id = v_user AND r.used_at IS NULL;
    INSERT INTO public.password_resets (token_hash, user_id, expires_at, ip)
    VALUES (p_token_hash, v_user, now() + make_interval(mins => least(greatest(p_minutes, 1), 30)), p_ip);
    PERFORM app.enqueue_email(p_email, 'password_reset', p_language, p_subject, p_text, p_html);
    RETURN v_user;
END
$$;

-- The reset a token's hash names: outcome ok, unknown, used or expired, with its account's email
-- (for the password policy, before the new password is hashed).
CREATE OR REPLACE FUNCTION app.find_password_reset(p_token_hash bytea)
    RETURNS TABLE (outcome text, user_id integer, email text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    SELECT x.user_id, x.expires_at, x.used_at, u.email::text AS email, u.is_active INTO r
      FROM public.password_resets x JOIN public.users u ON u.id = x.user_id
     WHERE x.token_hash = p_token_hash;
    IF NOT FOUND OR NOT r.is_active THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::integer, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT CASE WHEN r.used_at IS NOT NULL THEN 'used'
                             WHEN r.expires_at <= now() THEN 'expired' ELSE 'ok' END, r.user_id, r.email;
END
$$;

-- Use the token: the account's password becomes p_new_hash and every session of it ends, once
-- (a concurrent second use finds it used). Outcome as app.find_password_reset, and the number of
-- sessions ended.
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
    UPDATE public.users u SET password_hash = p_new_hash, password_changed_at = now() WHERE u.id = r.user_id;
    UPDATE public.user_sessions s SET revoked_at = now(), revoked_reason = 'password reset'
     WHERE s.user_id = r.user_id AND s.revoked_at IS NULL;
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN QUERY SELECT 'ok'::text, r.user_id, r.email, v_ended;
END
$$;

CALL app.lock_down_functions();
