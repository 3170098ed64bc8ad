-- 024: the email outbox. A message is written here in the same transaction as the action that
-- causes it (an invitation, a password reset ...): an action rolled back sends nothing, an action
-- committed loses no email. Senders (iafactory/notifications/sender.py, in `iafactory worker` and
-- in `serve` on the embedded default) deliver it over SMTP, or to the log without SMTP settings.
--
-- One table per cell, and no tenant_id. Emails to a tenant's people are personal data, so they stay
-- in the cell that holds those people (every cell runs this file; the directory's copy stays
-- empty). But a message is addressed to a person, not to a tenant: "verify your address" or a
-- password reset belongs to an account that may have no tenant, or several. A tenant table needs a
-- NOT NULL tenant_id that leads its primary key and its policy (tests/test_distribution_rules.py),
-- so the outbox is an account-level table like `users`: row security enabled and forced with no
-- policy for the application, which sees and changes rows only through the definer functions below
-- (enqueue, claim, finish; `platform.*` for operators). Delivered messages are deleted after 30 days.
--
-- Leases, as for the indexing jobs (013): a claim holds a message until lease_until, which the
-- sender's heartbeat pushes forward while the SMTP conversation lasts; the token names one claim,
-- so a sender whose lease ran out can no longer record an outcome over another's. Two senders
-- therefore never hand one message to the SMTP server at once. (A sender that dies after the
-- server accepted a message but before recording it loses its lease and the message is sent again:
-- SMTP itself offers no more than at-least-once.)

CREATE TABLE IF NOT EXISTS email_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- One address, no whitespace (so no header injection through it).
    to_address      varchar(320) NOT NULL CHECK (to_address ~ '^[^[:space:]@]+@[^[:space:]@]+$'),
    subject         text NOT NULL CHECK (subject !~ '[\r\n]'),
    -- Both NULL once the SMTP server accepted the message: the links in them are credentials
    -- (invitation, password reset) and nobody needs them any more. A message delivered to the log
    -- keeps them, so that `iafactory outbox retry ID` can send it for real once SMTP is configured.
    text_body       text,
    html_body       text,
    language        varchar(8) NOT NULL,
    kind            varchar(50) NOT NULL,
    -- pending (queued, or waiting for its next attempt), sending (claimed, under lease), sent (the
    -- SMTP server accepted it), logged (no SMTP configured: printed in the log), failed (refused
    -- for good, or out of attempts).
    status          varchar(10) NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'sent', 'logged', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    last_error      text,
    lease_until     timestamptz,
    lease_token     uuid,
    worker          varchar(200)
);
CREATE INDEX IF NOT EXISTS idx_email_outbox_due ON email_outbox (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS idx_email_outbox_leases ON email_outbox (lease_until) WHERE status = 'sending';

ALTER TABLE email_outbox OWNER TO iaf_owner;
ALTER TABLE email_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE email_outbox FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS definer_all ON email_outbox;
CREATE POLICY definer_all ON email_outbox AS PERMISSIVE FOR ALL TO iaf_owner USING (true) WITH CHECK (true);
REVOKE ALL ON email_outbox FROM PUBLIC;

-- Queue one rendered message, in the caller's transaction (any scope of the application: a
-- request's tenant scope, or the anonymous one of registration). Senders are woken at commit
-- (NOTIFY is transactional: a rolled-back enqueue wakes nobody).
CREATE OR REPLACE FUNCTION app.enqueue_email(p_to text, p_kind text, p_language text, p_subject text,
                                             p_text text, p_html text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO public.email_outbox (to_address, kind, language, subject, text_body, html_body)
    VALUES (p_to, p_kind, p_language, p_subject, p_text, p_html)
    RETURNING id INTO v_id;
    PERFORM pg_notify('email_outbox', '');
    RETURN v_id;
END
$$;

-- The oldest due message: pending and due, or sending on a lease that ran out. Counts the attempt.
CREATE OR REPLACE FUNCTION app.claim_email(p_lease_seconds integer, p_worker text)
    RETURNS TABLE (id bigint, to_address text, subject text, text_body text, html_body text, language text,
                   kind text, attempts integer, lease_token uuid)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
#variable_conflict use_column
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds < 1 THEN
        RAISE EXCEPTION 'a lease is at least one second' USING ERRCODE = 'IA409';
    END IF;
    RETURN QUERY
        UPDATE public.email_outbox m
        SET status = 'sending', attempts = m.attempts + 1,
            lease_until = now() + make_interval(secs => p_lease_seconds),
            lease_token = gen_random_uuid(), worker = left(p_worker, 200)
        FROM (SELECT q.id FROM public.email_outbox q
              WHERE (q.status = 'pending' AND q.next_attempt_at <= now())
                 OR (q.status = 'sending' AND q.lease_until < now())
              ORDER BY q.next_attempt_at, q.id
              LIMIT 1
              FOR UPDATE SKIP LOCKED) next
        WHERE m.id = next.id
        RETURNING m.id, m.to_address::text, m.subject, m.text_body, m.html_body, m.language::text, m.kind::text,
                  m.attempts, m.lease_token;
END
$$;

-- Push a held lease forward (the sender's heartbeat). False: the lease was lost.
CREATE OR REPLACE FUNCTION app.renew_email_lease(p_id bigint, p_token uuid, p_lease_seconds integer) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    UPDATE public.email_outbox SET lease_until = now() + make_interval(secs => p_lease_seconds)
    WHERE id = p_id AND lease_token = p_token AND status = 'sending';
    RETURN FOUND;
END
$$;

-- Record the outcome of a held message. False (nothing changed): the lease was lost.
--   sent     the SMTP server accepted it (its bodies are erased)
--   logged   no SMTP configured: printed in the log (bodies kept)
--   retry    a temporary failure: pending again in p_retry_seconds
--   failed   refused for good, or out of attempts
--   released the sender is stopping before it began: pending again at once, the attempt not counted
CREATE OR REPLACE FUNCTION app.finish_email(p_id bigint, p_token uuid, p_outcome text, p_error text DEFAULT NULL,
                                            p_retry_seconds integer DEFAULT 0) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_now timestamptz := now();  -- a value, not a call, inside the CASEs below (Citus refuses a call there)
BEGIN
    IF p_outcome NOT IN ('sent', 'logged', 'retry', 'failed', 'released') THEN
        RAISE EXCEPTION 'unknown outcome %', p_outcome USING ERRCODE = 'IA409';
    END IF;
    UPDATE public.email_outbox m
    SET status = CASE p_outcome WHEN 'retry' THEN 'pending' WHEN 'released' THEN 'pending' ELSE p_outcome END,
        attempts = CASE WHEN p_outcome = 'released' THEN greatest(m.attempts - 1, 0) ELSE m.attempts END,
        sent_at = CASE WHEN p_outcome IN ('sent', 'logged') THEN v_now END,
        text_body = CASE WHEN p_outcome = 'sent' THEN NULL ELSE m.text_body END,
        html_body = CASE WHEN p_outcome = 'sent' THEN NULL ELSE m.html_body END,
        last_error = CASE WHEN p_outcome IN ('retry', 'failed') THEN left(p_error, 2000) ELSE m.last_error END,
        next_attempt_at = CASE WHEN p_outcome = 'retry' THEN v_now + make_interval(secs => greatest(p_retry_seconds, 0))
                               WHEN p_outcome = 'released' THEN v_now ELSE m.next_attempt_at END,
        lease_until = NULL, lease_token = NULL
    WHERE m.id = p_id AND m.lease_token = p_token AND m.status = 'sending';
    IF FOUND AND p_outcome IN ('retry', 'released') THEN
        PERFORM pg_notify('email_outbox', '');
    END IF;
    RETURN FOUND;
END
$$;

-- Finished messages older than p_keep_days, a batch at a time (the senders call it when idle).
CREATE OR REPLACE FUNCTION app.purge_email_outbox(p_keep_days integer DEFAULT 30, p_limit integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
DECLARE
    v_deleted integer;
BEGIN
    DELETE FROM public.email_outbox
    WHERE id = ANY (ARRAY(SELECT q.id FROM public.email_outbox q
                          WHERE q.status IN ('sent', 'logged', 'failed')
                            AND coalesce(q.sent_at, q.created_at) < now() - make_interval(days => p_keep_days)
                          ORDER BY q.id LIMIT least(greatest(p_limit, 1), 10000)
                          FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;

-- `iafactory outbox list`: the messages (never their bodies), newest first. p_state: NULL (all),
-- 'pending' (pending or sending), or one status.
CREATE OR REPLACE FUNCTION platform.email_outbox_list(p_state text, p_limit integer DEFAULT 100)
    RETURNS TABLE (id bigint, to_address text, kind text, language text, subject text, status text,
                   attempts integer, created_at timestamptz, next_attempt_at timestamptz, sent_at timestamptz,
                   last_error text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        SELECT m.id, m.to_address::text, m.kind::text, m.language::text, m.subject, m.status::text, m.attempts,
               m.created_at, m.next_attempt_at, m.sent_at, m.last_error
        FROM public.email_outbox m
        WHERE p_state IS NULL OR m.status = p_state OR (p_state = 'pending' AND m.status = 'sending')
        ORDER BY m.id DESC
        LIMIT greatest(p_limit, 1);
END
$$;

-- `iafactory outbox retry`: message p_id (failed, logged or waiting), or every failed one when
-- p_id is NULL, is due now with a fresh count of attempts. Returns the ids.
CREATE OR REPLACE FUNCTION platform.email_outbox_retry(p_id bigint) RETURNS SETOF bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = ''
    AS $$
BEGIN
    PERFORM app.assert_platform_operator();
    RETURN QUERY
        UPDATE public.email_outbox m
        SET status = 'pending', attempts = 0, next_attempt_at = now(), sent_at = NULL
        WHERE CASE WHEN p_id IS NULL THEN m.status = 'failed'
                   ELSE m.id = p_id AND m.status IN ('failed', 'logged', 'pending') END
        RETURNING m.id;
    PERFORM pg_notify('email_outbox', '');
END
$$;

CALL app.lock_down_functions();
